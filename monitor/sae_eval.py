"""How good is an SAE on given text? (``sae-monitor sae-eval``)

Reports the measures Gemma Scope and SAELens publish: fraction of variance unexplained (FVU),
mean L0, the fraction of latents never active, and next-token cross-entropy of the model run
clean, with the SAE's reconstruction spliced in at its hook point, and with that residual
zero-ablated; CE loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean).

Position 0 of every text, and any position whose norm exceeds the SAE's ``max_input_norm``
("massive activations"), is left alone when splicing and excluded from FVU/L0: such positions
are attention sinks with norms ~100x the median, outside what the SAE was trained on, and the
monitor ignores them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from monitor.activations import Progress, progress_callback
from monitor.capture import HookPoint, residual_hook
from monitor.sae import SAE


@dataclass(frozen=True)
class SAEEvalResult:
    fvu: float
    l0: float
    dead_fraction: float
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_recovered: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over positions whose target is a real token."""
    target_mask = mask[:, 1:].bool()
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                       reduction="none").view_as(target_mask)
    return float(loss[target_mask].sum()), int(target_mask.sum())


@torch.no_grad()
def evaluate_sae(model: nn.Module, tokenizer: Any, sae: SAE, texts: Sequence[str], *,
                 point: HookPoint | None = None, ctx: int = 256, batch_size: int = 8,
                 progress: Progress | bool | None = None) -> SAEEvalResult:
    """Evaluate ``sae`` at ``point`` (default: its own hook point) on ``texts``;
    ``progress(texts done, texts)`` after each batch."""
    callback = progress_callback(progress)
    point = point or sae.hook_point
    l0_sum = 0.0
    ever = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    ce_tokens = 0
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"][:ctx] for t in texts]
    encoded = [e for e in encoded if len(e) >= 2]
    sq_err_total, n_x = 0.0, 0
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    sum_x2 = torch.zeros((), dtype=torch.float64)
    for b in range(0, len(encoded), batch_size):
        batch = encoded[b:b + batch_size]
        width = max(len(e) for e in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(batch):
            ids[i, :len(e)] = torch.tensor(e)
            mask[i, :len(e)] = 1
        keep = mask.bool().clone()
        keep[:, 0] = False
        outliers = torch.zeros_like(keep)

        def find_outliers(resid: torch.Tensor) -> None:
            outliers.copy_(~sae.input_mask(resid))

        with residual_hook(model, point, find_outliers):
            logits = model(input_ids=ids, attention_mask=mask).logits
        keep &= ~outliers
        loss, count = _ce(logits, ids, mask)
        ce["clean"] += loss
        ce_tokens += count

        def splice(resid: torch.Tensor) -> torch.Tensor:
            nonlocal sq_err_total, n_x, l0_sum
            x = resid[keep].to(sae.W_enc.dtype)
            f = sae.encode(x)
            x_hat = sae.decode(f, x)
            sq_err_total += float((x.double() - x_hat.double()).pow(2).sum())
            sum_x.add_(x.double().sum(0))
            sum_x2.add_(x.double().pow(2).sum())
            n_x += len(x)
            active = f > 0
            l0_sum += float(active.sum())
            ever.logical_or_(active.any(0))
            out = resid.clone()
            out[keep] = x_hat.to(resid.dtype)
            return out

        with residual_hook(model, point, splice):
            loss, _ = _ce(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        ce["spliced"] += loss

        def zero(resid: torch.Tensor) -> torch.Tensor:
            out = resid.clone()
            out[keep] = 0
            return out

        with residual_hook(model, point, zero):
            loss, _ = _ce(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        ce["zero"] += loss
        if callback:
            callback(min(b + batch_size, len(encoded)), len(encoded))
    total_var = float(sum_x2 - sum_x.pow(2).sum() / max(n_x, 1))
    clean, spliced, zeroed = (ce[key] / max(ce_tokens, 1) for key in ("clean", "spliced", "zero"))
    recovered = (zeroed - spliced) / (zeroed - clean) if zeroed != clean else float("nan")
    return SAEEvalResult(fvu=sq_err_total / max(total_var, 1e-12), l0=l0_sum / max(n_x, 1),
                         dead_fraction=1 - float(ever.float().mean()), ce_clean=clean,
                         ce_spliced=spliced, ce_zero=zeroed, ce_recovered=recovered, tokens=n_x)
