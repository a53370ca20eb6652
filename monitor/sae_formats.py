"""Readers of the on-disk SAE layouts, each converted into one canonical (config, tensors) pair.

Part of the SAE stage (hook -> **SAE encode** -> policy engine -> actions). Every third-party
layout is turned into the same weights (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec``,
``b_dec``, ``threshold``) and :class:`~monitor.sae_config.SAEConfig`, checked for presence,
shape and finiteness, so :class:`~monitor.sae.SAE` sees one format:

* SAELens (``cfg.json`` + ``sae_weights.safetensors``, v5 and v6 keys). A ``topk`` SAE saved
  with ``rescale_acts_by_decoder_norm: true`` encodes ``topk((x W_enc + b_enc) * |W_dec|)``;
  we fold the decoder norms into the weights exactly as SAELens's own ``fold_W_dec_norm`` does,
  which gives the same latents and reconstruction with a plain topk.
* EleutherAI sparsify (``cfg.json`` + ``sae.safetensors``; the directory is named after its
  hookpoint, e.g. ``layers.12``). Only plain TopK autoencoders are read: ``groupmax``,
  ``skip_connection`` and ``transcode`` change what the latents mean and are refused.
* Gemma Scope ``params.npz`` (JumpReLU). The file records no layer; the ``layer_N`` folder of
  its path (``.../layer_12/width_16k/average_l0_71/params.npz``) gives it, or ``layer=``.

A file that would be read wrongly is refused with the reason, never loaded silently wrong.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from monitor.errors import SAEFormatError
from monitor.sae_config import SAELENS_CFG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, SAEConfig
from monitor.sae_hooks import check_residual_hook

Loaded = tuple[SAEConfig, dict[str, torch.Tensor]]

_GEMMASCOPE_LAYER = re.compile(r"^layer_(\d+)(?:_|$)")
_GEMMASCOPE_REPO = re.compile(r"gemma-scope-.*?-(res|mlp|att|attn|transcoders?)(?:-canonical)?$")
_GEMMASCOPE_KINDS = {"mlp": "the MLP output", "att": "the attention output",
                     "attn": "the attention output", "transcoder": "a transcoder (MLP input to "
                     "MLP output)", "transcoders": "a transcoder (MLP input to MLP output)"}


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or :class:`SAEFormatError` naming the file and line."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SAEFormatError(f"{path}: missing; an SAE directory needs its {path.name}") from None
    except json.JSONDecodeError as exc:
        raise SAEFormatError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    if not isinstance(data, dict):
        raise SAEFormatError(f"{path}: expected a JSON object")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise SAEFormatError(f"{path}: not a readable safetensors file ({exc})") from None


def checked(cfg: SAEConfig, tensors: dict[str, torch.Tensor], source: Path) -> Loaded:
    """``(cfg, tensors)`` with exactly the canonical tensors, each checked for presence, shape
    and finiteness (errors name ``source``, the tensor and both shapes)."""
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
    return cfg, {name: tensors[name] for name in expected}


def fold_decoder_norm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold ``|W_dec|`` into the encoder (SAELens's ``_fold_norm_topk``), in float32.

    SAELens's topk with ``rescale_acts_by_decoder_norm`` computes
    ``f = topk((x W_enc + b_enc) * n)`` and decodes ``(f / n) W_dec + b_dec`` with
    ``n = |W_dec|`` per latent. Scaling ``W_enc``'s columns and ``b_enc`` by ``n`` and dividing
    ``W_dec``'s rows by ``n`` gives the same ``f`` and the same reconstruction. A latent whose
    decoder row is zero never fires there (its pre-activation is multiplied by 0); its folded
    decoder row stays zero.
    """
    W_enc, b_enc, W_dec = (tensors[n].float() for n in ("W_enc", "b_enc", "W_dec"))
    norm = W_dec.norm(dim=-1)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    folded = dict(tensors)
    folded["W_enc"] = (W_enc * norm).to(tensors["W_enc"].dtype)
    folded["b_enc"] = (b_enc * norm).to(tensors["b_enc"].dtype)
    folded["W_dec"] = (W_dec / safe[:, None]).to(tensors["W_dec"].dtype)
    return folded


# --------------------------------------------------------------------- SAELens
def load_saelens(path: Path) -> Loaded:
    source = path / SAELENS_CFG
    raw = read_json(source)
    cfg = SAEConfig.from_saelens(raw, str(source))
    tensors = read_safetensors(path / SAELENS_WEIGHTS)
    rescale = raw.get("rescale_acts_by_decoder_norm", False)
    if not isinstance(rescale, bool):
        raise SAEFormatError(f"{source}: 'rescale_acts_by_decoder_norm' must be true or false, "
                             f"got {rescale!r}")
    if rescale and cfg.architecture == "topk" and "W_dec" in tensors:
        # SAELens reads the flag only for topk (its other configs drop the key), so do we.
        tensors = fold_decoder_norm(tensors)
    return checked(cfg, tensors, path / SAELENS_WEIGHTS)


# --------------------------------------------------------------------- sparsify
def load_sparsify(path: Path, layer: int | None = None) -> Loaded:
    """A sparsify TopK SAE; its hookpoint comes from the directory name or ``layer``."""
    source = path / SAELENS_CFG
    raw = read_json(source)
    refused = []
    if raw.get("activation", "topk") != "topk":
        refused.append(f"activation={raw['activation']!r} (only 'topk' is read; groupmax keeps "
                       "the largest latent of each of k groups, a different code)")
    if raw.get("skip_connection"):
        refused.append("skip_connection=true (its W_skip adds x W_skip to the output, which "
                       "sae-monitor does not model)")
    if raw.get("transcode"):
        refused.append("transcode=true (a transcoder predicts a module's output from its input; "
                       "its latents are not an encoding of the residual stream)")
    tensors = read_safetensors(path / SPARSIFY_WEIGHTS)
    if "W_skip" in tensors and not raw.get("skip_connection"):
        refused.append("a W_skip tensor (a skip connection sae-monitor does not model)")
    if refused:
        raise SAEFormatError(f"{source}: this sparsify SAE cannot be read exactly: "
                             + "; ".join(refused) + ". Use a plain TopK sparse autoencoder.")
    if "encoder.weight" not in tensors:
        raise SAEFormatError(f"{path / SPARSIFY_WEIGHTS}: tensor 'encoder.weight' is missing")
    d_sae, d_in = tensors["encoder.weight"].shape
    if raw.get("d_in") not in (None, d_in):
        raise SAEFormatError(f"{source}: d_in={raw['d_in']} but encoder.weight has d_in={d_in}")
    k = raw.get("k", 32)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= d_sae:
        raise SAEFormatError(f"{source}: k must be an integer in 1..{d_sae}, got {k!r}")
    hook_name = sparsify_hook_name(path, layer)
    cfg = SAEConfig(architecture="topk", d_in=int(d_in), d_sae=int(d_sae), k=k,
                    apply_b_dec_to_input=True, hook_name=hook_name,
                    metadata={"source_format": "sparsify", "hookpoint": path.name, **raw})
    remapped = {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors.get("encoder.bias"),
                "W_dec": tensors.get("W_dec"), "b_dec": tensors.get("b_dec")}
    return checked(cfg, {k: v for k, v in remapped.items() if v is not None}, path / SPARSIFY_WEIGHTS)


def sparsify_hook_name(path: Path, layer: int | None) -> str:
    """``blocks.L.hook_resid_post`` for a sparsify directory named after a block (``layers.L``).

    sparsify names each SAE's directory after the module it hooks; a block's output is the
    residual stream after that block. Submodules (``layers.12.mlp``) are refused; a directory
    renamed to something without a layer needs ``layer=``.
    """
    name = path.name
    if re.fullmatch(r"(?:[A-Za-z_]+\.)*\d+", name):
        hook = check_residual_hook(name, source=str(path))
        found = int(name.rsplit(".", 1)[1])
        return f"blocks.{layer if layer is not None else found}.hook_{hook[1]}"
    if re.search(r"\.\d+\.", name):
        check_residual_hook(name, source=str(path))  # raises with the reason (mlp, attention)
    if layer is None:
        raise SAEFormatError(
            f"{path}: cannot tell which layer this sparsify SAE reads: sparsify names an SAE's "
            f"directory after its hookpoint (e.g. 'layers.12'), and {name!r} has no layer "
            f"number. Pass the layer: load_sae({str(path)!r}, layer=12), or rename the "
            "directory to its hookpoint."
        )
    return f"blocks.{layer}.hook_resid_post"


# --------------------------------------------------------------------- Gemma Scope
def load_gemmascope(path: Path, layer: int | None = None) -> Loaded:
    """A Gemma Scope JumpReLU ``params.npz``, at ``layer`` or the ``layer_N`` of its path."""
    import numpy as np

    kind = gemmascope_kind(path)
    if kind in _GEMMASCOPE_KINDS:
        raise SAEFormatError(
            f"{path}: this Gemma Scope SAE reads {_GEMMASCOPE_KINDS[kind]}, not the residual "
            "stream; sae-monitor hooks only the residual stream. Use a '-res' Gemma Scope SAE."
        )
    found = gemmascope_layer(path)
    if layer is None and found is None:
        raise SAEFormatError(
            f"{path}: a Gemma Scope params.npz does not record its layer and its path has no "
            f"layer_N folder; pass the layer: load_sae({str(path)!r}, layer=12)"
        )
    try:
        with np.load(path) as params:
            tensors = {k: torch.from_numpy(params[k].copy()) for k in params.files}
    except Exception as exc:
        raise SAEFormatError(f"{path}: not a readable .npz file ({exc})") from None
    if "W_enc" not in tensors:
        raise SAEFormatError(f"{path}: tensor 'W_enc' is missing")
    d_in, d_sae = tensors["W_enc"].shape
    at = layer if layer is not None else found
    cfg = SAEConfig(architecture="jumprelu", d_in=int(d_in), d_sae=int(d_sae),
                    hook_name=f"blocks.{at}.hook_resid_post", hook_layer=at,
                    metadata={"source_format": "gemmascope"})
    return checked(cfg, tensors, path)


def gemmascope_layer(path: Path) -> int | None:
    """The ``N`` of the innermost ``layer_N`` folder of ``path`` (``layer_12``, ``layer_5_width_16k``)."""
    for part in reversed(path.parts):
        match = _GEMMASCOPE_LAYER.match(part)
        if match:
            return int(match.group(1))
    return None


def gemmascope_kind(path: Path) -> str | None:
    """``res``, ``mlp``, ``att`` or ``transcoders`` from a Gemma Scope repository name in ``path``
    (``gemma-scope-2b-pt-mlp``, also in a Hugging Face cache ``models--google--gemma-scope-...``)."""
    for part in reversed(path.parts):
        match = _GEMMASCOPE_REPO.search(part)
        if match:
            return match.group(1)
    return None
