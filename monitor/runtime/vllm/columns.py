"""Second stage for the vLLM adapter: residual rows -> the feature columns a policy reads.

Uses the engine-agnostic :class:`monitor.runtime.encoder.FeatureEncoder` where the core
provides it; otherwise :class:`ColumnEncoder`, the same computation as the transformers
adapter (``monitor.wrapper``): the watched SAE latents through ``SAE.subset_encoder`` (only
those columns of ``W_enc``), then the catalog's probes. One call encodes every monitored row
of a forward pass, whatever request it belongs to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from monitor.catalog import Catalog
from monitor.errors import MonitorError
from monitor.policy import CompiledPolicy, SteerDirective
from monitor.sae import SAE


class Encoder(Protocol):
    """What the worker needs from an encoder (the core's ``FeatureEncoder`` satisfies it)."""

    def encode(self, resid: torch.Tensor) -> torch.Tensor: ...

    def content_mask(self, resid: torch.Tensor) -> torch.Tensor: ...

    def steer_delta(self, resid: torch.Tensor, directives: Sequence[SteerDirective]) -> torch.Tensor: ...


class ColumnEncoder:
    """``encode(resid[..., d]) -> [..., F]`` float32 columns of ``policy.features``."""

    def __init__(self, sae: SAE, policy: CompiledPolicy, catalog: Catalog | None) -> None:
        self.sae = sae
        self.catalog = catalog
        self.subset = sae.subset_encoder(policy.latent_indices)
        probes = policy.probe_names
        if probes and catalog is None:
            raise MonitorError("the policies use probes but no catalog was given; pass the catalog "
                               "file that defines them")
        pairs = [catalog.probe(name) for name in probes] if catalog is not None else []
        self.probe_matrix = (torch.stack([v.float() for v, _ in pairs], dim=1) if pairs else None)
        self.probe_bias = torch.tensor([float(b) for _, b in pairs], dtype=torch.float32)

    @torch.no_grad()
    def encode(self, resid: torch.Tensor) -> torch.Tensor:
        x = resid.to(self.sae.W_enc.dtype)
        latents = self.subset(x).float()
        if self.probe_matrix is None:
            return latents
        probes = x.float() @ self.probe_matrix.to(x.device) + self.probe_bias.to(x.device)
        return torch.cat([latents, probes], dim=-1)

    def content_mask(self, resid: torch.Tensor) -> torch.Tensor:
        """False at positions the SAE cannot read ("massive activations", see ``SAE.input_mask``)."""
        return self.sae.input_mask(resid)

    @torch.no_grad()
    def steer_delta(self, resid: torch.Tensor, directives: Sequence[SteerDirective]) -> torch.Tensor:
        """What to add to ``resid[rows, d]`` (row ``directive.row``), applied one directive
        after another as the transformers adapter does."""
        x = resid.float().clone()
        for d in directives:  # steering is rare: a few directives per step at most
            row = x[d.row]
            if d.latent is not None:
                a = self.sae.encode_subset(row.to(self.sae.W_enc.dtype), [d.latent])[..., 0].float()
                direction = self.sae.W_dec[d.latent].float().to(row.device)
            else:
                if self.catalog is None or d.probe is None:
                    raise MonitorError(f"rule {d.rule_id!r} steers a probe but no catalog was given")
                vec, bias = self.catalog.probe(d.probe)
                vec = vec.float().to(row.device)
                direction = vec / vec.norm().clamp_min(1e-8) ** 2
                a = row @ vec + bias
            target = d.value if d.op == "clamp" else a * d.value
            x[d.row] = row + (target - a)[..., None] * direction
        return x - resid.float()


def build_encoder(sae: SAE, policy: CompiledPolicy, catalog: Catalog | None) -> Encoder:
    """The core's ``FeatureEncoder`` when present, else :class:`ColumnEncoder`."""
    try:
        from monitor.runtime.encoder import FeatureEncoder
    except ImportError:
        return ColumnEncoder(sae, policy, catalog)
    return FeatureEncoder(sae, policy, catalog)
