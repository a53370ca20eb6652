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
read Gemma Scope's ``params.npz`` and EleutherAI sparsify's ``cfg.json`` + ``sae.safetensors``.
Unknown ``cfg.json`` keys are kept, so files from newer tools still load.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from monitor.errors import SAEFormatError, SAEMismatchError

Architecture = Literal["relu", "jumprelu", "topk", "batchtopk"]
ARCHITECTURES: tuple[str, ...] = ("relu", "jumprelu", "topk", "batchtopk")
_ARCH_ALIASES = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk",
                 "batchtopk": "batchtopk", "batch_topk": "batchtopk"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "torch.float32": torch.float32, "torch.float16": torch.float16,
           "torch.bfloat16": torch.bfloat16}
Normalization = Literal["none", "constant_norm_rescale", "layer_norm"]

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMASCOPE_PARAMS = "params.npz"
SHIPPED_DIR = Path(__file__).parent / "saes"


@dataclass(frozen=True)
class SAEConfig:
    """What an SAE is and where it reads. Mirrors SAELens's ``cfg.json``.

    ``k`` is required for topk and batchtopk (for batchtopk it is the training k, kept for
    the record). ``normalize_activations`` is applied per token at encode and undone at decode:
    ``none`` (any constant scaling is folded into the weights), ``constant_norm_rescale``
    (scale each token to norm sqrt(d_in)) or ``layer_norm``.
    """

    architecture: Architecture
    d_in: int
    d_sae: int
    k: int | None = None
    apply_b_dec_to_input: bool = False
    normalize_activations: Normalization = "none"
    model_name: str = ""
    hook_name: str = ""
    hook_layer: int | None = None
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEFormatError(
                f"unknown SAE architecture {self.architecture!r}; valid: {', '.join(ARCHITECTURES)}"
            )
        if self.architecture in ("topk", "batchtopk") and not self.k:
            raise SAEFormatError(f"a {self.architecture} SAE needs k in its config")
        if self.normalize_activations not in ("none", "constant_norm_rescale", "layer_norm"):
            raise SAEFormatError(
                f"normalize_activations={self.normalize_activations!r} is not supported; fold a "
                "constant scaling factor into the weights and use 'none', or use "
                "'constant_norm_rescale' or 'layer_norm'"
            )

    def to_saelens(self) -> dict[str, Any]:
        """``cfg.json`` contents readable by SAELens (v5 and v6 keys both present).

        batchtopk is written as SAELens's inference form, ``jumprelu`` with a threshold vector;
        ``metadata.trained_architecture`` records the truth for us.
        """
        arch = {"relu": "standard", "batchtopk": "jumprelu"}.get(self.architecture, self.architecture)
        metadata = {**self.metadata, "model_name": self.model_name, "hook_name": self.hook_name,
                    "hook_layer": self.hook_layer, "trained_architecture": self.architecture}
        if self.k:
            metadata["k"] = self.k
        cfg: dict[str, Any] = {
            "architecture": arch, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": self.dtype,
            "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations, "model_name": self.model_name,
            "hook_name": self.hook_name, "hook_layer": self.hook_layer, "metadata": metadata,
        }
        if self.architecture == "topk":
            cfg["k"] = self.k
            cfg["activation_fn_kwargs"] = {"k": self.k}
        return cfg

    @classmethod
    def from_saelens(cls, raw: dict[str, Any], source: str = "cfg.json") -> SAEConfig:
        meta = dict(raw.get("metadata") or {})
        arch_raw = str(meta.get("trained_architecture") or raw.get("architecture") or "standard")
        if arch_raw not in _ARCH_ALIASES:
            raise SAEFormatError(
                f"{source}: unknown architecture {arch_raw!r}; valid: {', '.join(sorted(_ARCH_ALIASES))}"
            )
        arch = _ARCH_ALIASES[arch_raw]
        if raw.get("activation_fn_str") == "topk" or raw.get("activation_fn") == "topk":
            arch = "topk"
        k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k") or meta.get("k")
        for key in ("d_in", "d_sae"):
            if not isinstance(raw.get(key), int):
                raise SAEFormatError(f"{source}: missing or non-integer '{key}'")
        norm = raw.get("normalize_activations") or "none"
        if norm == "expected_average_only_in":
            # SAELens folds this scaling factor into the weights when it saves a trained SAE.
            norm = "none"
        known = {"architecture", "d_in", "d_sae", "k", "apply_b_dec_to_input",
                 "normalize_activations", "model_name", "hook_name", "hook_layer", "dtype",
                 "metadata", "activation_fn_kwargs", "device"}
        extra = {k_: v for k_, v in raw.items() if k_ not in known}
        return cls(
            architecture=arch, d_in=raw["d_in"], d_sae=raw["d_sae"], k=int(k) if k else None,
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", False)),
            normalize_activations=norm,
            model_name=str(raw.get("model_name") or meta.get("model_name") or ""),
            hook_name=str(raw.get("hook_name") or meta.get("hook_name") or ""),
            hook_layer=raw.get("hook_layer", meta.get("hook_layer")),
            dtype=str(raw.get("dtype") or "float32").replace("torch.", ""),
            metadata={**{k_: v for k_, v in meta.items() if k_ != "trained_architecture"}, **extra},
        )


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
        mu = x.mean(dim=-1, keepdim=True)
        centered = x - mu
        std = centered.std(dim=-1, keepdim=True).clamp_min(1e-5)
        return centered / std, std, mu

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
        if self.cfg.normalize_activations == "constant_norm_rescale":
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
    def load(cls, path: str | Path, *, dtype: torch.dtype | None = torch.float32) -> SAE:
        """Load from a directory in SAELens, sparsify or Gemma Scope layout, or ``params.npz``.

        ``dtype`` converts the weights (float32 by default: fast on CPUs); ``None`` keeps the
        stored precision.
        """
        path = Path(path)
        sae = cls._load_any(path, dtype)
        sae.source_path = path
        return sae

    @classmethod
    def _load_any(cls, path: Path, dtype: torch.dtype | None) -> SAE:
        if path.is_file() and path.suffix == ".npz":
            return _load_gemmascope(path, dtype)
        if not path.is_dir():
            raise SAEFormatError(f"{path}: no such SAE directory. Pass a directory holding "
                                 f"{SAELENS_CFG} + {SAELENS_WEIGHTS}, or 'default'.")
        if (path / SAELENS_WEIGHTS).is_file():
            return _load_saelens(path, dtype)
        if (path / SPARSIFY_WEIGHTS).is_file():
            return _load_sparsify(path, dtype)
        if (path / GEMMASCOPE_PARAMS).is_file():
            return _load_gemmascope(path / GEMMASCOPE_PARAMS, dtype)
        raise SAEFormatError(
            f"{path}: no SAE weights found; expected {SAELENS_WEIGHTS} (SAELens), "
            f"{SPARSIFY_WEIGHTS} (sparsify) or {GEMMASCOPE_PARAMS} (Gemma Scope)"
        )

    @property
    def hook_point(self):  # -> HookPoint, imported lazily to keep this module light
        from monitor.capture import HookPoint

        if self.cfg.hook_name:
            point = HookPoint.parse(self.cfg.hook_name)
            return point if self.cfg.hook_layer is None else HookPoint(int(self.cfg.hook_layer), point.site)
        if self.cfg.hook_layer is None:
            raise SAEFormatError("this SAE's config names no hook_name or hook_layer; set one")
        return HookPoint(int(self.cfg.hook_layer))


def load_sae(name_or_path: str | Path = "default", *, dtype: torch.dtype | None = torch.float32) -> SAE:
    """Load an SAE by path, or a shipped one by name (``"default"``)."""
    shipped = SHIPPED_DIR / str(name_or_path)
    if isinstance(name_or_path, str) and "/" not in name_or_path and shipped.is_dir():
        return SAE.load(shipped, dtype=dtype)
    if str(name_or_path) == "default":
        raise SAEFormatError(
            f"the shipped default SAE is missing from {shipped}; reinstall sae-monitor "
            "(pip install -e .) or pass --sae PATH"
        )
    return SAE.load(name_or_path, dtype=dtype)


# --------------------------------------------------------------------- layout loaders
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SAEFormatError(f"{path}: missing; an SAE directory needs its {path.name}") from None
    except json.JSONDecodeError as exc:
        raise SAEFormatError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    if not isinstance(data, dict):
        raise SAEFormatError(f"{path}: expected a JSON object")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise SAEFormatError(f"{path}: not a readable safetensors file ({exc})") from None


def _assemble(cfg: SAEConfig, tensors: dict[str, torch.Tensor], source: Path,
              dtype: torch.dtype | None) -> SAE:
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,),
                "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
    if cfg.architecture in ("jumprelu", "batchtopk"):
        expected["threshold"] = (cfg.d_sae,)
    for name, shape in expected.items():
        if name not in tensors:
            raise SAEFormatError(f"{source}: tensor '{name}' is missing (expected shape {list(shape)})")
        found = tuple(tensors[name].shape)
        if found != shape:
            raise SAEFormatError(
                f"{source}: tensor '{name}' has shape {list(found)}, expected {list(shape)} "
                f"from d_in={cfg.d_in}, d_sae={cfg.d_sae} in the config"
            )
        if not torch.isfinite(tensors[name].float()).all():
            raise SAEFormatError(f"{source}: tensor '{name}' contains NaN or infinite values")
    stored = tensors["W_enc"].dtype
    sae = SAE(cfg, dtype=dtype or stored)
    with torch.no_grad():
        for name in expected:
            getattr(sae, name).copy_(tensors[name])
    return sae


def _load_saelens(path: Path, dtype: torch.dtype | None) -> SAE:
    cfg = SAEConfig.from_saelens(_read_json(path / SAELENS_CFG), str(path / SAELENS_CFG))
    return _assemble(cfg, _read_safetensors(path / SAELENS_WEIGHTS), path / SAELENS_WEIGHTS, dtype)


def _load_sparsify(path: Path, dtype: torch.dtype | None) -> SAE:
    raw = _read_json(path / SAELENS_CFG)
    tensors = _read_safetensors(path / SPARSIFY_WEIGHTS)
    if "encoder.weight" not in tensors:
        raise SAEFormatError(f"{path / SPARSIFY_WEIGHTS}: tensor 'encoder.weight' is missing")
    d_sae, d_in = tensors["encoder.weight"].shape
    if raw.get("d_in") not in (None, d_in):
        raise SAEFormatError(f"{path / SAELENS_CFG}: d_in={raw['d_in']} but encoder.weight has d_in={d_in}")
    cfg = SAEConfig(architecture="topk", d_in=int(d_in), d_sae=int(d_sae), k=int(raw.get("k") or 32),
                    apply_b_dec_to_input=True, hook_name=str(path.name),
                    metadata={"source_format": "sparsify", **raw})
    remapped = {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors.get("encoder.bias"),
                "W_dec": tensors.get("W_dec"), "b_dec": tensors.get("b_dec")}
    return _assemble(cfg, {k: v for k, v in remapped.items() if v is not None}, path / SPARSIFY_WEIGHTS, dtype)


def _load_gemmascope(path: Path, dtype: torch.dtype | None) -> SAE:
    import numpy as np

    try:
        with np.load(path) as params:
            tensors = {k: torch.from_numpy(params[k].copy()) for k in params.files}
    except Exception as exc:
        raise SAEFormatError(f"{path}: not a readable .npz file ({exc})") from None
    if "W_enc" not in tensors:
        raise SAEFormatError(f"{path}: tensor 'W_enc' is missing")
    d_in, d_sae = tensors["W_enc"].shape
    cfg = SAEConfig(architecture="jumprelu", d_in=int(d_in), d_sae=int(d_sae),
                    metadata={"source_format": "gemmascope"})
    return _assemble(cfg, tensors, path, dtype)


# --------------------------------------------------------------------- metrics
def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: ``sum |x - x_hat|^2 / sum |x - mean(x)|^2`` over tokens."""
    x = x.reshape(-1, x.shape[-1]).float()
    x_hat = x_hat.reshape(-1, x.shape[-1]).float()
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return float(residual / total.clamp_min(1e-12))
