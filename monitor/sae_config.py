"""What an SAE is and where it reads: :class:`SAEConfig`, mirroring SAELens's ``cfg.json``.

Part of the SAE stage. Kept apart from :mod:`monitor.sae` (the module that computes) so the
layout readers in :mod:`monitor.sae_formats` can build configs without importing the model
class: ``sae_config`` <- ``sae_formats`` <- ``sae``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, cast

from monitor.errors import SAEFormatError
from monitor.sae_hooks import check_residual_hook

Architecture = Literal["relu", "jumprelu", "topk", "batchtopk"]
ARCHITECTURES: tuple[str, ...] = ("relu", "jumprelu", "topk", "batchtopk")
_ARCH_ALIASES = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk",
                 "batchtopk": "batchtopk", "batch_topk": "batchtopk"}
Normalization = Literal["none", "constant_norm_rescale", "layer_norm"]

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMASCOPE_PARAMS = "params.npz"
# The SAELens config format we write (its loader rebuilds pre-6.0 configs and drops metadata).
SAELENS_FORMAT_VERSION = "6.0.0"
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
        if self.hook_name:
            check_residual_hook(self.hook_name)

    def to_saelens(self) -> dict[str, Any]:
        """``cfg.json`` contents readable by SAELens (v5 and v6 keys both present).

        batchtopk is written as SAELens's inference form, ``jumprelu`` with a threshold vector;
        ``metadata.trained_architecture`` records the truth for us. ``metadata.sae_lens_version``
        marks the file as SAELens 6 format: SAELens's loader rebuilds a config without it as a
        pre-6.0 one, keeping only its own metadata keys (``max_input_norm`` would be lost).
        """
        from monitor import __version__

        arch = {"relu": "standard", "batchtopk": "jumprelu"}.get(self.architecture, self.architecture)
        metadata = {**self.metadata, "model_name": self.model_name, "hook_name": self.hook_name,
                    "hook_layer": self.hook_layer, "trained_architecture": self.architecture,
                    "sae_lens_version": SAELENS_FORMAT_VERSION,
                    "sae_lens_training_version": self.metadata.get("sae_lens_training_version"),
                    "written_by": f"sae-monitor {__version__}"}
        if self.k:
            metadata["k"] = self.k
        cfg: dict[str, Any] = {
            "architecture": arch, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": self.dtype,
            "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations, "reshape_activations": "none",
            "model_name": self.model_name, "hook_name": self.hook_name,
            "hook_layer": self.hook_layer, "metadata": metadata,
        }
        if self.architecture == "topk":
            cfg["k"] = self.k
            cfg["activation_fn_kwargs"] = {"k": self.k}
            cfg["rescale_acts_by_decoder_norm"] = False  # decoder norms are in the weights
        return cfg

    @classmethod
    def from_saelens(cls, raw: dict[str, Any], source: str = "cfg.json") -> SAEConfig:
        """Read a SAELens ``cfg.json`` (v5 or v6). Missing keys take SAELens's defaults
        (``apply_b_dec_to_input`` is true there); non-residual hooks are refused."""
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
        if raw.get("reshape_activations", "none") not in (None, "none"):
            raise SAEFormatError(
                f"{source}: reshape_activations={raw['reshape_activations']!r} marks an SAE on "
                "attention heads (hook_z); sae-monitor hooks only the residual stream")
        if raw.get("hook_head_index", meta.get("hook_head_index")) is not None:
            raise SAEFormatError(f"{source}: hook_head_index is set, so this SAE reads one attention "
                                 "head; sae-monitor hooks only the residual stream")
        norm = raw.get("normalize_activations") or "none"
        if norm is True:  # pre-6.0 SAELens booleans
            norm = "expected_average_only_in"
        if norm == "expected_average_only_in":
            # SAELens folds this scaling factor into the weights when it saves a trained SAE.
            norm = "none"
        known = {"architecture", "d_in", "d_sae", "k", "apply_b_dec_to_input",
                 "normalize_activations", "model_name", "hook_name", "hook_layer", "dtype",
                 "metadata", "activation_fn_kwargs", "device", "reshape_activations",
                 "rescale_acts_by_decoder_norm", "hook_head_index"}
        extra = {k_: v for k_, v in raw.items() if k_ not in known}
        dropped = {"trained_architecture", "sae_lens_version",
                   "written_by", "hook_name", "hook_layer", "model_name", "k"}
        hook_layer = raw.get("hook_layer", meta.get("hook_layer"))
        try:
            return cls(
                architecture=cast(Architecture, arch), d_in=raw["d_in"], d_sae=raw["d_sae"],
                k=int(k) if k else None,
                apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                normalize_activations=cast(Normalization, norm),
                model_name=str(raw.get("model_name") or meta.get("model_name") or ""),
                hook_name=str(raw.get("hook_name") or meta.get("hook_name") or ""),
                hook_layer=_layer_number(hook_layer, source),
                dtype=str(raw.get("dtype") or "float32").replace("torch.", ""),
                metadata={**{k_: v for k_, v in meta.items() if k_ not in dropped}, **extra},
            )
        except SAEFormatError as exc:
            message = str(exc)
            raise SAEFormatError(message if message.startswith(source) else f"{source}: {message}") from None


def _layer_number(value: Any, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SAEFormatError(f"{source}: hook_layer must be a non-negative integer, got {value!r}")
    return value
