"""The SAE fit self-test: does this SAE read this model's activations where it is attached?

Run when a monitor is built (``self_test=True``), before any policy relies on the SAE. It
needs the model, which is why it lives in the runtime and not in :mod:`monitor.sae`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from monitor.capture import HookPoint, find_blocks, forward_through
from monitor.errors import SAEMismatchError
from monitor.sae import SAE, fvu

CALIBRATION_TEXT = (
    "The committee met on Tuesday to review the budget. After a long discussion, they agreed "
    "to fund the new library and to repair the bridge over the river before winter.\n"
    "def read_config(path):\n    with open(path) as handle:\n        return json.load(handle)\n\n"
    "User: Can you explain why the sky is blue?\nAssistant: Sunlight is scattered by the "
    "molecules in the air, and blue light is scattered more than red light because it has a "
    "shorter wavelength. That is why we see a blue sky during the day."
)



def check_fit(sae: SAE, model: nn.Module, tokenizer: Any, *, point: Any = None,
              max_fvu: float = 0.6, text: str = CALIBRATION_TEXT) -> float:
    """Refuse an SAE that does not reconstruct the model's activations; return its FVU.

    Users most often attach an SAE to the wrong layer, hook site or model, or forget its
    normalisation; it then silently reads noise. Encoding a short calibration text catches that
    before any policy relies on it, in two ways: the fraction of variance unexplained must be
    at most ``max_fvu`` (another model or normalisation gives FVU well above 1), and the SAE
    must fit its own layer better than the blocks just before and after it (an off-by-one
    layer fits only slightly worse, so no absolute limit could catch it).
    """
    point = point if point is not None else sae.hook_point
    point = point if isinstance(point, HookPoint) else HookPoint(int(point))
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is not None and hidden != sae.cfg.d_in:
        raise SAEMismatchError(
            f"SAE d_in={sae.cfg.d_in} does not match the model's hidden size {hidden}: this SAE "
            "belongs to another model"
        )
    n_blocks = len(find_blocks(model))
    if not 0 <= point.layer < n_blocks:
        raise SAEMismatchError(f"the SAE reads layer {point.layer}, but the model has {n_blocks} blocks")
    candidates = [point] + [HookPoint(layer, point.site) for layer in (point.layer - 1, point.layer + 1)
                            if 0 <= layer < n_blocks]
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    scores: dict[HookPoint, float] = {}

    def measure(p: HookPoint):
        def hook(resid: torch.Tensor) -> None:
            acts = resid[0, 1:].to(sae.W_enc.dtype)  # position 0 is an attention sink
            acts = acts[sae.input_mask(acts)]
            scores[p] = fvu(acts, sae(acts))
        return hook

    forward_through(model, {p: measure(p) for p in candidates}, input_ids=ids)
    score = scores[point]
    if not score <= max_fvu:
        raise SAEMismatchError(
            f"SAE self-test failed at {point.name}: fraction of variance unexplained {score:.3f} "
            f"> limit {max_fvu}. The SAE probably belongs to another model, layer or hook site, "
            "or expects a normalisation it is not getting. Check the layer and hook "
            "(resid_post vs resid_pre), or raise max_fvu if this is intended."
        )
    better = min((p for p in candidates if p != point), key=lambda p: scores[p], default=None)
    if better is not None and scores[better] < score:
        raise SAEMismatchError(
            f"SAE self-test failed: it reconstructs {better.name} (FVU {scores[better]:.3f}) better "
            f"than {point.name}, where it is attached (FVU {score:.3f}); it was probably trained "
            f"on layer {better.layer}. Attach it there, or fix hook_layer in its cfg.json."
        )
    return score
