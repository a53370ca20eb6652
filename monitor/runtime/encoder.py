"""Second stage of the pipeline: residual activations -> the columns a policy reads.

:class:`FeatureEncoder` is built once per (SAE, policy version, catalog) and called per step.
It computes exactly the columns of ``policy.features`` (the watched SAE latents in ascending
order, then the probes by name) and nothing else. For ReLU / JumpReLU / BatchTopK SAEs without
per-token input normalisation it is one fused affine map ``x @ [W_enc[:, watched] | P] + b``
followed by the activation on the latent columns: one matmul per step, whatever the number of
rules. TopK SAEs need the full encode (a latent's value depends on every other latent).

A catalog probe may read another layer than the SAE's (``layer:`` in the catalog):
:attr:`FeatureEncoder.extra_layers` lists those layers, and ``encode(resid, extra)`` takes their
residuals (``extra[layer]``, same positions) and writes those probes' columns; the SAE's layer
stays one fused matmul. The scan hooks every such layer; live generation the earlier ones
(:meth:`~monitor.runtime.hf_request.HFRequest.layer_hooks`). Steering a probe read at another layer is refused (edits apply at the
SAE's layer only).

It also turns steering directives into residual edits: ``residual += (target - a) * direction``
where ``direction`` is the latent's decoder row (or the probe direction scaled so that one unit
of edit moves the probe score by one) and ``target`` is the clamp value or ``a * factor``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from monitor.errors import MonitorError

if TYPE_CHECKING:
    from monitor.catalog import Catalog
    from monitor.policy import CompiledPolicy, SteerDirective
    from monitor.sae import SAE


class FeatureEncoder:
    """Encodes the columns one compiled policy reads; see the module docstring."""

    def __init__(self, sae: SAE, policy: CompiledPolicy, catalog: Catalog | None) -> None:
        self.sae = sae
        self.catalog = catalog
        self.version_id = policy.version_id
        self.n_latents = int(policy.latent_indices.numel())
        probes = policy.probe_names
        if probes and catalog is None:
            raise MonitorError("the policies use probes but no catalog was given; pass catalog= "
                               "(the catalog file that defines them)")
        pairs = [catalog.probe(name) for name in probes] if catalog is not None else []
        d_in = sae.cfg.d_in
        own_layer = [catalog.get(name).layer for name in probes] if catalog is not None else []
        # Only a probe that names its own layer needs the SAE's (an SAE may not know it).
        self.sae_layer = sae.hook_point.layer if any(x is not None for x in own_layer) else -1
        layers = [self.sae_layer if x is None else x for x in own_layer] or [self.sae_layer] * len(probes)
        self.n_probes = len(probes)
        self.extra_layers: tuple[int, ...] = tuple(sorted({x for x in layers if x != self.sae_layer}))
        _refuse_steering_elsewhere(policy, dict(zip(probes, layers)), self.sae_layer)
        own = [i for i, x in enumerate(layers) if x == self.sae_layer]
        self.own_columns = torch.tensor([self.n_latents + i for i in own], dtype=torch.long)
        self.probe_matrix = (torch.stack([pairs[i][0].float() for i in own], dim=1) if own
                             else torch.zeros(d_in, 0))
        self.probe_bias = torch.tensor([float(pairs[i][1]) for i in own], dtype=torch.float32)
        self.extra: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for layer in self.extra_layers:  # columns, [d_in, k] directions, [k] biases
            idx = [i for i, x in enumerate(layers) if x == layer]
            self.extra[layer] = (torch.tensor([self.n_latents + i for i in idx], dtype=torch.long),
                                 torch.stack([pairs[i][0].float() for i in idx], dim=1),
                                 torch.tensor([float(pairs[i][1]) for i in idx], dtype=torch.float32))
        self.subset = sae.subset_encoder(policy.latent_indices)
        self.max_input_norm = sae.max_input_norm
        self.architecture = sae.cfg.architecture
        self.fused = bool(getattr(self.subset, "is_cheap", False)) and sae.cfg.normalize_activations == "none"
        if self.fused:
            W = self.subset.W.float()
            b = self.subset.b.float()
            if sae.cfg.apply_b_dec_to_input:
                b = b - sae.b_dec.float() @ W  # (x - b_dec) @ W + b == x @ W + (b - b_dec @ W)
            self.weight = torch.cat([W, self.probe_matrix], dim=1).contiguous()
            self.bias = torch.cat([b, self.probe_bias])
            self.threshold = self.subset.threshold.float()
        self._devices: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @property
    def n_columns(self) -> int:
        return self.n_latents + self.n_probes

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        cached = self._devices.get(device)
        if cached is None:
            if self.fused:
                cached = (self.weight.to(device), self.bias.to(device), self.threshold.to(device))
            else:
                cached = (self.probe_matrix.to(device), self.probe_bias.to(device))
            self._devices[device] = cached
        return cached

    @torch.no_grad()
    def encode(self, resid: torch.Tensor, extra: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """``[..., d_in]`` residual at the SAE's layer -> ``[..., F]`` float32 columns of
        ``policy.features``. ``extra[layer]``: the residual at each layer of
        :attr:`extra_layers` for the same positions (needed exactly when that tuple is not empty)."""
        if not self.extra_layers:
            return self._encode_own(resid)
        own = self._encode_own(resid)
        out = own.new_empty(*own.shape[:-1], self.n_columns)
        out[..., : self.n_latents] = own[..., : self.n_latents]
        out[..., self.own_columns.to(out.device)] = own[..., self.n_latents:]
        for layer, (columns, matrix, bias) in self.extra.items():
            x = extra.get(layer) if extra is not None else None
            if x is None or tuple(x.shape[:-1]) != tuple(resid.shape[:-1]):
                raise MonitorError(f"a probe of this policy reads layer {layer}, but the residual of "
                                   f"layer {layer} was not captured for these positions; the runtime must "
                                   f"hook every layer in FeatureEncoder.extra_layers {self.extra_layers}")
            out[..., columns.to(out.device)] = x.float() @ matrix.to(x.device) + bias.to(x.device)
        return out

    def _encode_own(self, resid: torch.Tensor) -> torch.Tensor:
        """Latents, then the probes read at the SAE's layer."""
        x = resid.float()
        if self.fused:
            weight, bias, threshold = self._on(x.device)
            out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], -1)
            pre = out[..., : self.n_latents]
            if self.architecture == "relu":
                pre.clamp_(min=0)
            else:  # jumprelu / batchtopk inference: keep values above both 0 and the threshold
                pre.mul_((pre > threshold) & (pre > 0))
            return out
        latents = self.subset(resid).float()
        if not self.probe_bias.numel():
            return latents
        matrix, bias = self._on(x.device)
        return torch.cat([latents, x @ matrix + bias], dim=-1)

    def content_mask(self, resid: torch.Tensor) -> torch.Tensor:
        """True where a position carries content the SAE can read (see ``SAE.input_mask``):
        "massive activation" positions (attention sinks) are never monitored."""
        if self.max_input_norm == float("inf"):
            return torch.ones(resid.shape[:-1], dtype=torch.bool, device=resid.device)
        return resid.float().norm(dim=-1) <= self.max_input_norm

    @torch.no_grad()
    def steer_delta(self, resid: torch.Tensor, directives: Sequence[SteerDirective]) -> torch.Tensor:
        """What to add to ``resid[rows, d_in]`` (row ``i`` = ``directive.row``) to apply the
        directives: ``(target - a) * direction`` per directive, summed per row."""
        return self._steered(resid, directives) - resid.float()

    def apply_steers(self, resid: torch.Tensor, directives: Sequence[SteerDirective]) -> None:
        """Apply ``directives`` to ``resid[rows, ..., d_in]`` in place."""
        if directives:
            resid.copy_(self._steered(resid, directives).to(resid.dtype))

    @torch.no_grad()
    def _steered(self, resid: torch.Tensor, directives: Sequence[SteerDirective]) -> torch.Tensor:
        """``resid`` (float32 copy) with the directives applied in order."""
        work = resid.float().clone()  # directives apply in order: each sees the edits before it
        for d in directives:  # steering is rare: a few directives per step at most
            x = work[d.row]
            if d.latent is not None:
                a = self.sae.encode_subset(x.to(self.sae.W_enc.dtype), [d.latent])[..., 0].float()
                direction = self.sae.direction(d.latent).float().to(x.device)
            else:
                if self.catalog is None or d.probe is None:
                    raise MonitorError(f"rule {d.rule_id!r} steers a probe but no catalog was given")
                vec, bias = self.catalog.probe(d.probe)
                vec = vec.float().to(x.device)
                direction = vec / vec.norm().clamp_min(1e-8) ** 2
                a = x @ vec + bias
            target = d.value if d.op == "clamp" else a * d.value
            work[d.row] += (target - a)[..., None] * direction
        return work


def _refuse_steering_elsewhere(policy: CompiledPolicy, layers: Mapping[str, int], sae_layer: int) -> None:
    for rule in policy.rules:
        for spec in rule.steers:
            name = spec.target.name
            if spec.target.kind == "probe" and name is not None and layers.get(name, sae_layer) != sae_layer:
                raise MonitorError(f"rule '{rule.id}' steers probe '{name}', which reads layer "
                                   f"{layers[name]}; steering edits the residual at the SAE's layer "
                                   f"{sae_layer} only. Steer a feature read at layer {sae_layer}, or drop "
                                   "the steer action")
