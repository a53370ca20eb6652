"""Where an SAE reads: the residual-stream hook names we accept, and placing an SAE by hand.

Part of the SAE stage. sae-monitor hooks only the residual stream (``blocks.L.hook_resid_post``
/ ``hook_resid_pre``); an SAE trained anywhere else is refused with the reason, because it would
read activations it was never trained on and nothing downstream could tell.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

from monitor.errors import SAEFormatError

if TYPE_CHECKING:
    from monitor.sae import SAEConfig

_RESIDUAL_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_post|resid_pre)")
# A decoder block itself (SAELens / Hugging Face / sparsify module names): its output.
_BLOCK_MODULE = re.compile(r"(?:[A-Za-z_]+\.)*(?:blocks|layers|h)\.(\d+)")


def check_residual_hook(hook_name: str, *, source: str | None = None) -> tuple[int, str]:
    """``(layer, site)`` of a residual-stream hook name, or :class:`SAEFormatError` saying why not.

    Accepts ``blocks.L.hook_resid_post`` / ``blocks.L.hook_resid_pre`` (SAELens) and a block's
    module name (``model.layers.L``, ``layers.L``: its output, i.e. resid_post). Every other
    site is refused: an SAE trained on the MLP output, attention or ``resid_mid`` would read
    activations it was never trained on, and nothing downstream could tell.
    """
    match = _RESIDUAL_HOOK.fullmatch(hook_name)
    if match:
        return int(match.group(1)), match.group(2)
    match = _BLOCK_MODULE.fullmatch(hook_name)
    if match:
        return int(match.group(1)), "resid_post"
    lowered = hook_name.lower()
    what = ("the residual stream between attention and MLP (resid_mid)" if "resid_mid" in lowered
            else "the MLP" if "mlp" in lowered
            else "attention" if any(s in lowered for s in ("attn", "hook_z", "attention", "hook_q",
                                                           "hook_k", "hook_v"))
            else "the embeddings" if "embed" in lowered
            else "a site that is not the residual stream")
    raise SAEFormatError(
        f"{source + ': ' if source else ''}hook {hook_name!r} reads {what}; sae-monitor hooks only the residual stream "
        "(blocks.L.hook_resid_post or blocks.L.hook_resid_pre), so this SAE would read "
        "activations it was not trained on. Use an SAE trained on the residual stream."
    )


def check_layer_arg(layer: int | None, hook: str | None) -> int | None:
    """The layer the caller asked for (``layer``, else the one in a full ``hook`` name)."""
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise SAEFormatError(f"layer= must be a non-negative integer, got {layer!r}")
    if hook is None or hook in ("resid_post", "resid_pre"):
        return layer
    found, _site = check_residual_hook(hook, source="hook=")
    if layer is not None and layer != found:
        raise SAEFormatError(f"hook={hook!r} names layer {found} but layer={layer} was passed; "
                             "pass one of them")
    return found


def placed(cfg: SAEConfig, hook: str | None, layer: int | None) -> SAEConfig:
    """``cfg`` reading at ``hook`` / ``layer`` (given by the caller, so they win)."""
    site = "resid_post"
    if hook in ("resid_post", "resid_pre"):
        site = hook
    elif hook is not None:
        site = check_residual_hook(hook)[1]
    elif cfg.hook_name:
        site = check_residual_hook(cfg.hook_name)[1]
    if layer is None:
        if not cfg.hook_name and cfg.hook_layer is None:
            raise SAEFormatError(f"hook={hook!r} names no layer and the SAE's config has none; "
                                 "pass layer= too")
        layer = cfg.hook_layer if cfg.hook_layer is not None else check_residual_hook(cfg.hook_name)[0]
    return replace(cfg, hook_name=f"blocks.{layer}.hook_{site}", hook_layer=layer)
