"""The sparse autoencoder: one type, four architectures, three on-disk layouts.

Second stage of the pipeline (hook -> **SAE encode** -> policy engine -> actions).

Architectures, all sharing ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``:

* ``relu`` (SAELens "standard"): ``f = relu(x W_enc + b_enc)``;
* ``jumprelu``: ``f = pre * (pre > threshold)`` with a per-latent ``threshold``;
* ``batchtopk``: trained with a batch-level top-k, used at inference as a JumpReLU with one
  global threshold (Bussmann et al. 2024), so each latent depends only on its own pre-activation;
* ``topk``: keep the ``k`` largest pre-activations of each token.

Because relu, jumprelu and batchtopk latents each depend on one column of ``W_enc``,
:meth:`SAE.subset_encoder` computes only the latents a policy watches, exactly: watching 30
latents costs ``30 * d_in`` multiply-adds per token instead of ``d_sae * d_in``. A topk latent
depends on every other latent (it must be among the k largest), so topk needs the full encode;
:meth:`SAE.subset_encoder` still works for it but says so in ``is_cheap``.

On disk we read and write SAELens's layout (``cfg.json`` + ``sae_weights.safetensors``), and
read Gemma Scope's ``params.npz`` and EleutherAI sparsify's ``cfg.json`` + ``sae.safetensors``
(:mod:`monitor.sae_formats`). Unknown ``cfg.json`` keys are kept, so files from newer tools
still load; what would be read wrongly (an SAE on the MLP output or attention, a transcoder, a
skip connection) is refused with the reason. Only the residual stream is hooked
(``blocks.L.hook_resid_post`` / ``hook_resid_pre``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from monitor import sae_formats as formats
from monitor.errors import SAEFormatError, SAEMismatchError
from monitor.sae_config import (  # noqa: F401 - re-exported: monitor.sae is where users look
    ARCHITECTURES,
    GEMMASCOPE_PARAMS,
    SAELENS_CFG,
    SAELENS_FORMAT_VERSION,
    SAELENS_WEIGHTS,
    SPARSIFY_WEIGHTS,
    Architecture,
    Normalization,
    SAEConfig,
)
from monitor.sae_hooks import check_layer_arg, check_residual_hook, placed  # noqa: F401

if TYPE_CHECKING:
    from monitor.capture import HookPoint

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "torch.float32": torch.float32, "torch.float16": torch.float16,
           "torch.bfloat16": torch.bfloat16}
SHIPPED_DIR = Path(__file__).parent / "saes"


class SubsetEncoder:
    """Encodes only a chosen set of latents. Built once per policy set, called per token.

    ``__call__(x)`` equals ``sae.encode(x)[..., latents]`` (up to float rounding) for every
    architecture; for relu/jumprelu/batchtopk it costs ``len(latents) * d_in`` per token
    (``is_cheap``), for topk it runs the full encode.
    """

    def __init__(self, sae: SAE, latents: torch.Tensor) -> None:
        self.sae = sae
        self.latents = latents.to(torch.long)
        self.is_cheap = sae.cfg.architecture != "topk"
        if self.is_cheap:
            self.W = sae.W_enc[:, self.latents].contiguous()
            self.b = sae.b_enc[self.latents].contiguous()
            self.threshold = sae.threshold[self.latents].contiguous()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_cheap:
            return self.sae.encode(x)[..., self.latents]
        pre = self.sae.encoder_input(x) @ self.W + self.b
        return self.sae.activate(pre, self.threshold)


class SAE(nn.Module):
    """A sparse autoencoder over one hook point of one model."""

    def __init__(self, cfg: SAEConfig, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = dtype or _DTYPES.get(cfg.dtype, torch.float32)
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        # relu and topk ignore it; jumprelu uses it per latent; batchtopk fills it with one value.
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype), requires_grad=False)
        #: Where the SAE was loaded from (None when built in memory): files that belong to it,
        #: such as its feature catalog, are looked up beside it.
        self.source_path: Path | None = None

    # ----------------------------------------------------------------- encode / decode
    def _normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        mode = self.cfg.normalize_activations
        if mode == "none":
            return x, None, None
        if mode == "constant_norm_rescale":
            scale = (self.cfg.d_in**0.5) / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            return x * scale, scale, None
        # As SAELens: (x - mu) / (std + 1e-5) in, out * std + mu back.
        mu = x.mean(dim=-1, keepdim=True)
        centered = x - mu
        std = centered.std(dim=-1, keepdim=True)
        return centered / (std + 1e-5), std, mu

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        x = self._normalize(x.to(self.W_enc.dtype))[0]
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def activate(self, pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(pre)
        if arch in ("jumprelu", "batchtopk"):
            return pre * (pre > threshold) * (pre > 0)
        values, indices = pre.topk(self.cfg.k or 0, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_sae]`` for residual activations ``[..., d_in]``."""
        pre = self.encoder_input(x) @ self.W_enc + self.b_enc
        return self.activate(pre, self.threshold)

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction ``[..., d_in]``. Per-token normalizations need the input ``x`` to undo."""
        out = f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.cfg.normalize_activations == "none":
            return out
        if x is None:
            raise ValueError(f"decode needs x to undo normalize_activations={self.cfg.normalize_activations}")
        _, scale, mu = self._normalize(x.to(self.W_enc.dtype))
        assert scale is not None  # normalize_activations is not "none" here
        if mu is None:  # constant_norm_rescale
            return out / scale
        return out * scale + mu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    def subset_encoder(self, latents: Sequence[int] | torch.Tensor) -> SubsetEncoder:
        """A callable computing only ``latents``; see :class:`SubsetEncoder`."""
        latents = torch.as_tensor(latents, dtype=torch.long)
        if latents.numel() and (latents.min() < 0 or latents.max() >= self.cfg.d_sae):
            raise SAEMismatchError(
                f"latent index out of range: this SAE has latents 0..{self.cfg.d_sae - 1}, "
                f"got {latents.min().item()}..{latents.max().item()}"
            )
        return SubsetEncoder(self, latents)

    def encode_subset(self, x: torch.Tensor, latents: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``encode(x)[..., latents]``, computed from only those latents' weights where exact."""
        return self.subset_encoder(latents)(x)

    @property
    def max_input_norm(self) -> float:
        """Residual norm above which a token is not encoded (``metadata.max_input_norm``).

        Some positions carry "massive activations" (norms 100x the median, e.g. attention
        sinks); an SAE is not trained on them and its latents there mean nothing.
        """
        return float(self.cfg.metadata.get("max_input_norm", float("inf")))

    def input_mask(self, x: torch.Tensor) -> torch.Tensor:
        """True where ``x[..., d_in]`` is within the SAE's input range (see ``max_input_norm``)."""
        limit = self.max_input_norm
        if limit == float("inf"):
            return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        return x.float().norm(dim=-1) <= limit

    def direction(self, latent: int) -> torch.Tensor:
        """The decoder row of ``latent``: what adding one unit of that latent adds to the residual."""
        return self.W_dec[latent]

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write SAELens's layout into directory ``path`` (created if missing)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        dtype = dtype or self.W_enc.dtype
        cfg = replace(self.cfg, dtype=str(dtype).replace("torch.", ""))
        tensors = {name: getattr(self, name).detach().to(dtype).contiguous()
                   for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if cfg.architecture in ("jumprelu", "batchtopk"):
            tensors["threshold"] = self.threshold.detach().to(dtype).contiguous()
        save_file(tensors, str(path / SAELENS_WEIGHTS))
        (path / SAELENS_CFG).write_text(json.dumps(cfg.to_saelens(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype | None = torch.float32,
             hook: str | None = None, layer: int | None = None) -> SAE:
        """Load from a directory in SAELens, sparsify or Gemma Scope layout, or ``params.npz``.

        ``dtype`` converts the weights (float32 by default: fast on CPUs); ``None`` keeps the
        stored precision. ``hook`` (``blocks.12.hook_resid_post``, or a site ``resid_pre`` /
        ``resid_post``) and ``layer`` say where the SAE reads when the files do not (a renamed
        sparsify directory, a Gemma Scope ``params.npz`` outside its ``layer_N`` folder) or
        say it wrongly; they take precedence over what the files say.
        """
        path = Path(path)
        layer = check_layer_arg(layer, hook)
        if path.is_file() and path.suffix == ".npz":
            cfg, tensors = formats.load_gemmascope(path, layer)
        elif not path.is_dir():
            raise SAEFormatError(f"{path}: no such SAE directory. Pass a directory holding "
                                 f"{SAELENS_CFG} + {SAELENS_WEIGHTS}, or 'default'.")
        elif (path / SAELENS_WEIGHTS).is_file():
            cfg, tensors = formats.load_saelens(path)
        elif (path / SPARSIFY_WEIGHTS).is_file():
            cfg, tensors = formats.load_sparsify(path, layer)
        elif (path / GEMMASCOPE_PARAMS).is_file():
            cfg, tensors = formats.load_gemmascope(path / GEMMASCOPE_PARAMS, layer)
        else:
            raise SAEFormatError(
                f"{path}: no SAE weights found; expected {SAELENS_WEIGHTS} (SAELens), "
                f"{SPARSIFY_WEIGHTS} (sparsify) or {GEMMASCOPE_PARAMS} (Gemma Scope)"
            )
        if hook is not None or layer is not None:
            cfg = placed(cfg, hook, layer)
        sae = cls(cfg, dtype=dtype or tensors["W_enc"].dtype)
        with torch.no_grad():
            for name, tensor in tensors.items():
                getattr(sae, name).copy_(tensor)
        sae.source_path = path
        return sae

    @property
    def hook_point(self) -> HookPoint:
        from monitor.capture import HookPoint  # imported lazily to keep this module light

        if self.cfg.hook_name:
            point = HookPoint.parse(self.cfg.hook_name)
            return point if self.cfg.hook_layer is None else HookPoint(int(self.cfg.hook_layer), point.site)
        if self.cfg.hook_layer is None:
            raise SAEFormatError("this SAE's config names no hook_name or hook_layer; say where it "
                                 "reads: load_sae(path, layer=12) or hook='blocks.12.hook_resid_post'")
        return HookPoint(int(self.cfg.hook_layer))


def load_sae(name_or_path: str | Path = "default", *, dtype: torch.dtype | None = torch.float32,
             hook: str | None = None, layer: int | None = None) -> SAE:
    """Load an SAE by path, or a shipped one by name (``"default"``).

    ``hook`` / ``layer``: where the SAE reads, when its files do not say (see :meth:`SAE.load`).
    """
    shipped = SHIPPED_DIR / str(name_or_path)
    if isinstance(name_or_path, str) and "/" not in name_or_path and shipped.is_dir():
        return SAE.load(shipped, dtype=dtype, hook=hook, layer=layer)
    if str(name_or_path) == "default":
        raise SAEFormatError(
            f"the shipped default SAE is missing from {shipped}; reinstall sae-monitor "
            "(pip install -e .) or pass --sae PATH"
        )
    return SAE.load(name_or_path, dtype=dtype, hook=hook, layer=layer)


# --------------------------------------------------------------------- metrics
def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: ``sum |x - x_hat|^2 / sum |x - mean(x)|^2`` over tokens."""
    x = x.reshape(-1, x.shape[-1]).float()
    x_hat = x_hat.reshape(-1, x.shape[-1]).float()
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return float(residual / total.clamp_min(1e-12))
