"""Training a sparse autoencoder for a model that has none (``sae-monitor train``).

The recipe follows EleutherAI's sparsify and Bussmann et al.'s BatchTopK:

1. stream texts (JSONL, chat rendered with the model's template, plain text, source files),
   tokenize them into windows of ``ctx`` tokens;
2. run the model only up to the hooked layer and store the residual activations on disk in
   float16 shards (resumable: finished shards are skipped), dropping each window's first
   position, an attention sink whose norm dwarfs the rest;
3. train on shuffled activations, scaled so that the mean squared norm is ``d_in``, with Adam,
   unit-norm decoder rows and the AuxK loss for dead latents. Only the k selected latents of
   each token get gradients, computed sparsely, so a step costs one dense encoder matmul;
4. fold the scaling into the weights and save SAELens's layout with a model card.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from monitor.activations import Progress, progress_callback
from monitor.capture import HookPoint, forward_through
from monitor.sae import SAE, SAEConfig

SHARD_WINDOWS = 256


# ----------------------------------------------------------------------------- tokens
def tokenize_windows(texts: Iterable[str], tokenizer: Any, *, ctx: int = 256,
                     max_windows_per_text: int = 4, min_tokens: int = 8) -> list[list[int]]:
    """Cut each text into at most ``max_windows_per_text`` windows of at most ``ctx`` tokens."""
    windows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for start in range(0, min(len(ids), ctx * max_windows_per_text), ctx):
            piece = ids[start:start + ctx]
            if len(piece) >= min_tokens:
                windows.append(piece)
    return windows


# ----------------------------------------------------------------------------- extraction
@torch.no_grad()
def extract_activations(model: nn.Module, windows: Sequence[list[int]], points: Sequence[HookPoint],
                        out_dir: str | Path, *, batch_size: int = 16, pad_id: int = 0,
                        progress: Progress | bool | None = None) -> dict[str, Any]:
    """Write residual activations at ``points`` for every window to ``out_dir``; resumable.

    Shards ``L{layer}_{site}/shard_NNNNN.npy`` hold float16 ``[tokens, d_model]``; a shard
    that exists is skipped, so a killed run continues where it stopped. Position 0 of each
    window and padding are dropped. ``progress(shards done, shards)`` after each shard.
    """
    callback = progress_callback(progress)
    out_dir = Path(out_dir)
    dirs = {p: out_dir / f"L{p.layer}_{p.site}" for p in points}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(len(windows) / SHARD_WINDOWS)
    for shard in range(n_shards):
        names = {p: dirs[p] / f"shard_{shard:05d}.npy" for p in points}
        if all(n.exists() for n in names.values()):
            continue
        # Sorting by length within a shard keeps padding small; training shuffles anyway.
        chunk = sorted(windows[shard * SHARD_WINDOWS:(shard + 1) * SHARD_WINDOWS], key=len)
        collected: dict[HookPoint, list[torch.Tensor]] = {p: [] for p in points}
        for b in range(0, len(chunk), batch_size):
            batch = chunk[b:b + batch_size]
            width = max(len(w) for w in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, w in enumerate(batch):
                ids[i, :len(w)] = torch.tensor(w)
                mask[i, :len(w)] = 1
            keep = mask.bool().clone()
            keep[:, 0] = False
            grabbed: dict[HookPoint, torch.Tensor] = {}

            def grab(p: HookPoint):
                def cb(resid: torch.Tensor) -> None:
                    grabbed[p] = resid[keep].to(torch.float16)
                return cb

            forward_through(model, {p: grab(p) for p in points}, input_ids=ids, attention_mask=mask)
            for p in points:
                collected[p].append(grabbed[p])
        for p in points:
            tmp = names[p].with_suffix(".tmp.npy")
            np.save(tmp, torch.cat(collected[p]).numpy())
            os.replace(tmp, names[p])
        if callback:
            callback(shard + 1, n_shards)
    manifest = {"windows": len(windows), "shards": n_shards, "points": [p.name for p in points]}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def load_activations(directory: str | Path, *, max_tokens: int | None = None) -> torch.Tensor:
    """Concatenate the float16 shards of one hook point into one tensor."""
    shards = sorted(Path(directory).glob("shard_*.npy"))
    arrays, total = [], 0
    for shard in shards:
        if shard.name.endswith(".tmp.npy"):
            continue
        arr = np.load(shard, mmap_mode="r")
        arrays.append(np.asarray(arr))
        total += len(arr)
        if max_tokens and total >= max_tokens:
            break
    acts = torch.from_numpy(np.concatenate(arrays))
    return acts[:max_tokens] if max_tokens else acts


# ----------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one SAE training run. Defaults suit a 135M model on a CPU."""

    d_sae: int = 8192
    k: int = 32
    architecture: Literal["batchtopk", "topk"] = "batchtopk"
    batch_tokens: int = 4096
    lr: float = 8e-4
    warmup_steps: int = 50
    decay_start: float = 0.8  # fraction of steps after which lr decays linearly to 0
    aux_k: int = 256
    aux_coef: float = 1 / 32
    dead_tokens: int = 1_000_000  # a latent silent for this many tokens counts as dead
    epochs: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    outlier_factor: float = 10.0  # tokens with norm > factor * median are "massive activations"


@dataclass
class TrainState:
    enc: torch.Tensor  # [d_sae, d_in]  (encoder rows; W_enc is its transpose)
    b_enc: torch.Tensor
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor
    scale: float  # activation scaling factor folded in at save time
    tokens_since_fired: torch.Tensor  # [d_sae] long: tokens since each latent last fired
    step: int = 0
    threshold_sum: float = 0.0
    threshold_count: int = 0


def _init_state(acts: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> TrainState:
    d_in = acts.shape[1]
    sample = acts[torch.randperm(len(acts), generator=generator)[:65536]].float()
    scale = math.sqrt(d_in / sample.pow(2).sum(-1).mean().item())
    W_dec = torch.randn(cfg.d_sae, d_in, generator=generator)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    return TrainState(enc=W_dec.clone(), b_enc=torch.zeros(cfg.d_sae), W_dec=W_dec,
                      b_dec=(sample * scale).mean(0), scale=scale,
                      tokens_since_fired=torch.zeros(cfg.d_sae, dtype=torch.long))


class _SparseEncode(torch.autograd.Function):
    """Selected pre-activations, with gradients computed sparsely.

    Forward reuses pre-activations already computed by the (gradient-free) dense encoder
    matmul. Backward builds the gradient of the selected entries as a sparse [d_sae, tokens]
    matrix, so the encoder gradient costs ``selected * d_in`` instead of a dense matmul.
    """

    @staticmethod
    def forward(ctx, values, x, enc, b_enc, b_dec, rows, cols):
        ctx.save_for_backward(values, x, enc, b_dec, rows, cols)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        values, x, enc, b_dec, rows, cols = ctx.saved_tensors
        g = grad * (values > 0)
        d_sae = enc.shape[0]
        grad_b_enc = torch.zeros(d_sae, dtype=g.dtype).index_add_(0, cols, g)
        order = torch.argsort(cols)
        crow = torch.zeros(d_sae + 1, dtype=torch.long)
        crow[1:] = torch.cumsum(torch.bincount(cols, minlength=d_sae), 0)
        g_t = torch.sparse_csr_tensor(crow, rows[order], g[order], (d_sae, x.shape[0]))
        grad_enc = g_t @ (x - b_dec)
        grad_b_dec = -(grad_b_enc @ enc)
        return None, None, grad_enc, grad_b_enc, grad_b_dec, None, None


def _sparse_decode(rows: torch.Tensor, cols: torch.Tensor, acts: torch.Tensor, W_dec: torch.Tensor,
                   n_rows: int) -> torch.Tensor:
    """``sum_j acts_j W_dec[cols_j]`` per row; ``rows`` must be sorted ascending."""
    offsets = torch.zeros(n_rows, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)[:-1]
    return nn.functional.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=acts)


def _select(pre: torch.Tensor, k: int, batch_level: bool, cap: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, rows, cols) of the selected latents, sorted by row.

    BatchTopK keeps the ``B * k`` largest pre-activations of the batch; candidates are first
    cut to each token's ``cap * k`` largest, which changes nothing unless one token would take
    more than ``cap * k`` of the batch's slots.
    """
    B = pre.shape[0]
    if not batch_level:
        values, top = pre.topk(k, dim=-1, sorted=False)
        rows = torch.arange(B).repeat_interleave(k)
        return values.flatten(), rows, top.flatten()
    cand_values, cand = pre.topk(min(cap * k, pre.shape[1]), dim=-1, sorted=False)
    values, flat = cand_values.flatten().topk(B * k, sorted=False)
    rows = flat // cand.shape[1]
    cols = cand.flatten()[flat]
    keep = values > 0
    values, rows, cols = values[keep], rows[keep], cols[keep]
    order = torch.argsort(rows)
    return values[order], rows[order], cols[order]


def train_sae(acts: torch.Tensor, cfg: TrainConfig, *, out: str | Path | None = None,
              resume: bool = True, progress: Progress | bool | None = None, log_every: int = 20,
              on_log: Callable[[dict[str, Any]], None] | None = None) -> tuple[SAE, dict[str, Any]]:
    """Train an SAE on ``acts`` ``[tokens, d_in]``; return it with a summary of the run.

    With ``out``, writes ``checkpoint.pt`` every ``checkpoint_every`` steps (atomically) and
    resumes from it. Returns an :class:`SAE` with the activation scaling folded in, so it takes
    raw residual activations. Every ``log_every`` steps ``on_log(record)`` gets the step's
    figures (FVU, L0, dead fraction, tokens/s) and ``progress(steps done, steps)`` is called.
    """
    callback = progress_callback(progress)
    generator = torch.Generator().manual_seed(cfg.seed)
    norms = acts[::max(1, len(acts) // 200_000)].float().norm(dim=-1)
    max_input_norm = float(norms.median()) * cfg.outlier_factor
    inliers = acts.float().norm(dim=-1) <= max_input_norm if len(acts) < 50_000 else _inliers(acts, max_input_norm)
    n_outliers = int((~inliers).sum())
    if n_outliers:
        acts = acts[inliers]
    n_tokens, d_in = acts.shape
    total_steps = max(1, int(cfg.epochs * n_tokens) // cfg.batch_tokens)
    ckpt_path = Path(out) / "checkpoint.pt" if out else None
    state = _init_state(acts, cfg, generator)
    params = [nn.Parameter(t) for t in (state.enc, state.b_enc, state.W_dec, state.b_dec)]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999))
    history: list[dict[str, float]] = []
    if ckpt_path and resume and ckpt_path.exists():
        saved = torch.load(ckpt_path, weights_only=False)
        with torch.no_grad():
            for p, t in zip(params, saved["params"]):
                p.copy_(t)
        optimizer.load_state_dict(saved["optimizer"])
        state.step, state.scale = saved["step"], saved["scale"]
        state.tokens_since_fired = saved["tokens_since_fired"]
        state.threshold_sum, state.threshold_count = saved["threshold_sum"], saved["threshold_count"]
        history = saved.get("history", [])
    enc, b_enc, W_dec, b_dec = params
    epoch_len = n_tokens // cfg.batch_tokens
    started, tokens_run = time.time(), 0
    perm = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(cfg.seed + state.step // max(epoch_len, 1)))
    for step in range(state.step, total_steps):
        if step % max(epoch_len, 1) == 0 and step != state.step:
            perm = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(cfg.seed + step // epoch_len))
        idx = perm[(step % max(epoch_len, 1)) * cfg.batch_tokens:][:cfg.batch_tokens]
        x = acts[idx].float() * state.scale
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        decay_from = int(cfg.decay_start * total_steps)
        if step >= decay_from:
            lr *= max(0.0, (total_steps - step) / max(1, total_steps - decay_from))
        for group in optimizer.param_groups:
            group["lr"] = lr

        with torch.no_grad():
            pre = torch.relu((x - b_dec) @ enc.T + b_enc)  # the one dense matmul per step
            B = x.shape[0]
            values, rows, cols = _select(pre, cfg.k, cfg.architecture == "batchtopk")
            if cfg.architecture == "batchtopk" and step >= decay_from and len(values):
                state.threshold_sum += values.min().item()
                state.threshold_count += 1
            fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
            fired[cols] = True
            state.tokens_since_fired += B
            state.tokens_since_fired[fired] = 0
            dead = state.tokens_since_fired > cfg.dead_tokens

        sel_acts = _SparseEncode.apply(values, x, enc, b_enc, b_dec, rows, cols)
        recon = _sparse_decode(rows, cols, sel_acts, W_dec, B) + b_dec
        err = x - recon
        total_var = (x - x.mean(0)).pow(2).sum()
        loss = err.pow(2).sum() / total_var
        aux_loss = torch.zeros(())
        n_dead = int(dead.sum())
        if n_dead and cfg.aux_coef > 0:
            # AuxK (Gao et al. 2024): the top dead latents must explain the remaining error,
            # which gives them gradients and brings them back.
            with torch.no_grad():
                k_aux = min(cfg.aux_k, n_dead)
                a_values, a_top = pre.masked_fill(~dead, 0.0).topk(k_aux, dim=-1, sorted=False)
                a_rows = torch.arange(B).repeat_interleave(k_aux)
                a_cols, a_values = a_top.flatten(), a_values.flatten()
            a_acts = _SparseEncode.apply(a_values, x, enc, b_enc, b_dec.detach(), a_rows, a_cols)
            target = err.detach()
            aux_recon = _sparse_decode(a_rows, a_cols, a_acts, W_dec, B)
            aux_loss = (target - aux_recon).pow(2).sum() / (target - target.mean(0)).pow(2).sum().clamp_min(1e-8)
            aux_loss = torch.nan_to_num(aux_loss)
        optimizer.zero_grad(set_to_none=True)
        (loss + cfg.aux_coef * aux_loss).backward()
        optimizer.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
        tokens_run += B
        state.step = step + 1
        if step % log_every == 0 or step == total_steps - 1:
            record = {"step": step, "fvu": loss.item(), "l0": len(cols) / B,
                      "dead": n_dead / cfg.d_sae, "aux": aux_loss.item(), "lr": lr,
                      "tok_s": tokens_run / max(time.time() - started, 1e-9)}
            history.append(record)
            if on_log:
                on_log(record)
            if callback:
                callback(step + 1, total_steps)
        if ckpt_path and (state.step % cfg.checkpoint_every == 0):
            _save_checkpoint(ckpt_path, params, optimizer, state, history)
    if ckpt_path:
        _save_checkpoint(ckpt_path, params, optimizer, state, history)
    sae = _fold(state, params, cfg, d_in)
    sae.cfg = replace(sae.cfg, metadata={**sae.cfg.metadata, "max_input_norm": max_input_norm})
    return sae, {"steps": total_steps, "tokens": total_steps * cfg.batch_tokens, "history": history,
                 "scale": state.scale, "outliers_dropped": n_outliers, "max_input_norm": max_input_norm}


def _inliers(acts: torch.Tensor, limit: float, chunk: int = 262_144) -> torch.Tensor:
    return torch.cat([acts[i:i + chunk].float().norm(dim=-1) <= limit for i in range(0, len(acts), chunk)])


def _save_checkpoint(path: Path, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                     state: TrainState, history: list[dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict(),
                "step": state.step, "scale": state.scale, "tokens_since_fired": state.tokens_since_fired,
                "threshold_sum": state.threshold_sum, "threshold_count": state.threshold_count,
                "history": history}, tmp)
    os.replace(tmp, path)


def _fold(state: TrainState, params: list[nn.Parameter], cfg: TrainConfig, d_in: int) -> SAE:
    """Turn the training parameters into an inference SAE that takes unscaled activations.

    Training saw ``x * s``; with ``W_enc' = s W_enc`` and ``W_dec' = W_dec / s``,
    ``b_dec' = b_dec / s`` the pre-activations are unchanged and the output is in raw units.
    """
    enc, b_enc, W_dec, b_dec = (p.detach() for p in params)
    s = state.scale
    threshold = state.threshold_sum / max(state.threshold_count, 1)
    sae = SAE(SAEConfig(architecture=cfg.architecture, d_in=d_in, d_sae=cfg.d_sae, k=cfg.k,
                        apply_b_dec_to_input=False,
                        metadata={"activation_scale": s, "train_config": asdict(cfg)}))
    with torch.no_grad():
        # encoder input is x (not x - b_dec): fold the b_dec subtraction into b_enc.
        sae.W_enc.copy_(enc.T * s)
        sae.b_enc.copy_(b_enc - b_dec @ enc.T)
        sae.W_dec.copy_(W_dec / s)
        sae.b_dec.copy_(b_dec / s)
        sae.threshold.fill_(threshold if cfg.architecture == "batchtopk" else 0.0)
    return sae


def evaluate_reconstruction(sae: SAE, acts: torch.Tensor, *, batch: int = 8192) -> dict[str, float]:
    """FVU, mean L0 and the fraction of latents never active on ``acts``."""
    sq_err, l0, count = 0.0, 0.0, 0
    ever = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    mean = torch.cat([c[sae.input_mask(c)] for c in acts.float().split(batch)]).mean(0)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(acts), batch):
            x = acts[i:i + batch].float()
            x = x[sae.input_mask(x)]
            f = sae.encode(x)
            x_hat = sae.decode(f, x)
            sq_err += float((x - x_hat).pow(2).sum())
            total += float((x - mean).pow(2).sum())
            active = f > 0
            l0 += float(active.sum())
            ever |= active.any(0)
            count += len(x)
    return {"fvu": sq_err / total, "l0": l0 / count, "dead_fraction": 1 - float(ever.float().mean()),
            "tokens": count}


def write_model_card(directory: str | Path, *, title: str, recipe: dict[str, Any],
                     metrics: dict[str, Any] | None = None, notes: str = "") -> Path:
    """A README.md beside the weights: what the SAE is, how it was made, how good it is."""
    directory = Path(directory)
    lines = [f"# {title}", "", "## Recipe", "", "```json", json.dumps(recipe, indent=2, default=str), "```", ""]
    if metrics:
        lines += ["## Quality", "", "| measure | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    if notes:
        lines += [notes.strip(), ""]
    path = directory / "README.md"
    path.write_text("\n".join(lines))
    return path


def run_training(*, model: str, data: Sequence[str], layer: int, site: str, max_tokens: int,
                 ctx: int, out: Path, cfg: TrainConfig, progress: Progress | None = None,
                 on_log: Callable[[dict[str, Any]], None] | None = None) -> SAE:
    """``sae-monitor train``: tokenize, extract (resumable), train (resumable), save, card.
    ``progress``/``on_log`` as :func:`train_sae` (extraction reports shards on ``progress``)."""
    from monitor.data import iter_texts
    from monitor.models import load_model

    lm, tokenizer = load_model(model)
    lm = lm.to(torch.bfloat16)
    point = HookPoint(layer, site)  # type: ignore[arg-type]
    windows, total = [], 0
    for w in tokenize_windows(iter_texts(data, tokenizer), tokenizer, ctx=ctx):
        if total >= max_tokens:
            break
        windows.append(w)
        total += len(w) - 1
    out.mkdir(parents=True, exist_ok=True)
    extract_activations(lm, windows, [point], out / "acts", pad_id=tokenizer.pad_token_id or 0, progress=progress)
    acts = load_activations(out / "acts" / f"L{point.layer}_{point.site}")
    sae, summary = train_sae(acts, cfg, out=out, progress=progress, on_log=on_log)
    sae.cfg = replace(sae.cfg, model_name=str(model), hook_name=point.name, hook_layer=layer)
    sae.save(out / "sae", dtype=torch.float16)
    metrics = evaluate_reconstruction(sae, acts[-min(len(acts), 200_000):])
    write_model_card(out / "sae", title=f"SAE for {model} at {point.name}",
                     recipe={"model": model, "hook": point.name, "data": list(map(str, data)),
                             "tokens": int(acts.shape[0]), "train": asdict(cfg), "steps": summary["steps"]},
                     metrics={f"train_{k}": v for k, v in metrics.items()})
    return sae
