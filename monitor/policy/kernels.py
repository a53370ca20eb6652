"""The vectorised evaluation of one scope's :class:`~monitor.policy.compiled.Program`.

Everything is batched over ``[batch, tokens, leaves]``; nothing here syncs with the host:

* all feature tests compare at once (one ``index_select`` and one comparison);
* ``window_mean`` / ``count_in_window`` use prefix sums over ``[history, chunk]`` where the
  history holds each row's last ``W`` monitored values, and ``searchsorted`` finds where each
  window starts in the monitored-token stream, so masked tokens never enter a window;
* ``consecutive`` keeps a run length per row and leaf and updates it with a ``cummax`` of the
  positions of failing tokens;
* ``scope_mean`` keeps a running sum per row and leaf and a monitored-token count per row; the
  carried sum is the first term of the chunk's ``cumsum``, so the additions happen in the same
  order whatever the chunking (one call or one token per call give identical decisions);
* the ``any``/``all``/``not`` tree is flattened into levels; each level is one gather and one
  ``all`` (``any(x) = not all(not x)``).

A NaN activation fails every feature test (so a ``not`` around it passes); a NaN inside a
``window_mean`` window fails that test while it is in the window, and a NaN in a
``scope_mean`` fails that test for the rest of the scope (it stays in the mean).

Every per-row tensor of :class:`ScopeState` has the batch dimension first, so states of
several requests can be concatenated along dim 0 and split back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from monitor.policy.compiled import Program

_NEVER = -(1 << 40)


@dataclass
class ScopeState:
    """Per-scope engine state of one request: token counter, window history, run lengths,
    running sums. Every tensor field is per row, batch dimension first."""

    tokens_seen: int
    history: torch.Tensor  # [B, W, Lw] last W monitored raw values of window leaves
    history_valid: torch.Tensor  # [B, W] right-aligned
    runs: torch.Tensor  # [B, Lc] current run length of consecutive leaves
    mean_sum: torch.Tensor  # [B, Lm] running sum of scope_mean leaves (float64; float32 on mps)
    mean_count: torch.Tensor  # [B] monitored tokens so far (long)

    @classmethod
    def fresh(cls, prog: Program, batch_size: int, device: torch.device) -> ScopeState:
        """Empty state for ``batch_size`` rows of ``prog`` on ``device``."""
        return cls(
            tokens_seen=0,
            history=torch.zeros(batch_size, prog.max_window, prog.n_window, device=device),
            history_valid=torch.zeros(batch_size, prog.max_window, dtype=torch.bool,
                                      device=device),
            runs=torch.zeros(batch_size, prog.n_consec, dtype=torch.long, device=device),
            mean_sum=torch.zeros(batch_size, prog.n_mean, dtype=_sum_dtype(device),
                                 device=device),
            mean_count=torch.zeros(batch_size, dtype=torch.long, device=device))


@dataclass
class Evaluation:
    """Per-token results of one chunk: leaf tests, their compared values, rule firings."""

    leaf_fired: torch.Tensor  # [B, T, L]
    leaf_value: torch.Tensor  # [B, T, L] compared value (window or scope mean for the means)
    rule_fired: torch.Tensor  # [B, T, Rs]


def _compare(x: torch.Tensor, thr: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
    return torch.where(above, x > thr, x < thr)


def evaluate(prog: Program, st: ScopeState, feats: torch.Tensor,
              mask: torch.Tensor) -> Evaluation:
    """Leaf tests, windows, runs and the condition tree for one chunk; updates ``st``."""
    x = feats.index_select(2, prog.leaf_col)  # [B, T, L]
    passed = _compare(x, prog.leaf_thr, prog.leaf_above) & mask.unsqueeze(-1)
    e, w = prog.n_each, prog.n_each + prog.n_window
    c = w + prog.n_consec
    parts_fired = [passed[..., :e]]
    parts_value = [x[..., :e]]
    if prog.n_window:
        f, v = _windows(prog, st, x[..., e:w], mask)
        parts_fired.append(f)
        parts_value.append(v)
    if prog.n_consec:
        parts_fired.append(_consecutive(prog, st, passed[..., w:c], mask))
        parts_value.append(x[..., w:c])
    if prog.n_mean:
        f, v = _scope_means(prog, st, x[..., c:], mask)
        parts_fired.append(f)
        parts_value.append(v)
    leaf_fired = torch.cat(parts_fired, -1)
    values = torch.cat([leaf_fired, torch.ones_like(leaf_fired[..., :1])], -1)
    for lv in prog.levels:
        n, width = lv.child_idx.shape
        kids = values.index_select(2, lv.child_idx.reshape(-1))
        kids = kids.view(*values.shape[:2], n, width) ^ lv.child_neg
        values = torch.cat([values, kids.all(-1) ^ lv.out_neg], -1)
    rule_fired = values.index_select(2, prog.rule_root) & mask.unsqueeze(-1)
    return Evaluation(leaf_fired, torch.cat(parts_value, -1), rule_fired)


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _windows(prog: Program, st: ScopeState, x: torch.Tensor,
             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Window leaves over the monitored-token stream: (fired, window mean or raw value)."""
    batch, tokens, n = x.shape
    hist_len = st.history.shape[1]
    xs = torch.cat([st.history, x], 1)  # [B, S, Lw]
    valid = torch.cat([st.history_valid, mask], 1)  # [B, S]
    passed = _compare(xs, prog.leaf_thr[prog.n_each:prog.n_each + n],
                      prog.leaf_above[prog.n_each:prog.n_each + n])
    dt = _sum_dtype(x.device)
    contrib = torch.where(prog.win_mean, xs.to(dt), passed.to(dt))
    contrib = torch.where(valid.unsqueeze(-1), contrib, torch.zeros((), dtype=dt, device=x.device))
    zero_row = torch.zeros(batch, 1, n, dtype=dt, device=x.device)
    prefix = torch.cat([zero_row, contrib.cumsum(1)], 1)  # [B, 1+S, Lw]
    counts = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=x.device),
                        valid.long().cumsum(1)], 1)  # [B, 1+S]
    now = counts[:, 1 + hist_len:]  # [B, T] monitored tokens up to and including t
    start = (now.unsqueeze(-1) - prog.win_tokens).clamp(min=0)  # [B, T, Lw]
    cut = torch.searchsorted(counts, start.reshape(batch, -1), right=True) - 1
    before = prefix.gather(1, cut.view(batch, tokens, n))
    total = prefix[:, 1 + hist_len:] - before
    count = (now.unsqueeze(-1) - start).to(dt)
    thr = prog.leaf_thr[prog.n_each:prog.n_each + n].to(dt)
    above = prog.leaf_above[prog.n_each:prog.n_each + n]
    mean_ok = torch.where(above, total > thr * count, total < thr * count)
    count_ok = total >= prog.win_at_least.to(dt)
    fired = torch.where(prog.win_mean, mean_ok, count_ok) & mask.unsqueeze(-1)
    mean = (total / count.clamp(min=1)).to(x.dtype)
    value = torch.where(prog.win_mean, mean, x)
    # Keep the last `hist_len` monitored values per row (right-aligned) for the next call.
    if hist_len:
        last = counts[:, -1:]  # [B, 1]
        want = last - hist_len + 1 + torch.arange(hist_len, device=x.device)  # [B, W]
        keep = want >= 1
        where = torch.searchsorted(counts, want.clamp(min=1), right=False) - 1
        where = where.clamp(0, xs.shape[1] - 1)  # empty slots read anything, then zeroed
        kept = xs.gather(1, where.unsqueeze(-1).expand(batch, hist_len, n))
        st.history = torch.where(keep.unsqueeze(-1), kept, torch.zeros((), device=x.device))
        st.history_valid = keep
    return fired, value


def _consecutive(prog: Program, st: ScopeState, passed: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """Run-length leaves: fired where the last N monitored tokens all passed."""
    counts = mask.long().cumsum(1).unsqueeze(-1)  # [B, T, 1]
    breaks = mask.unsqueeze(-1) & ~passed
    marks = torch.where(breaks, counts, torch.full((), _NEVER, device=passed.device))
    last_break = torch.maximum(marks.cummax(1).values, -st.runs.unsqueeze(1))
    run = counts - last_break  # monitored tokens since the last failing one
    st.runs = run[:, -1].clamp(max=prog.max_run)
    return passed & (run >= prog.cons_tokens)


def _scope_means(prog: Program, st: ScopeState, x: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scope-mean leaves: (fired, running mean over every monitored token of the scope)."""
    lo = prog.n_leaves - prog.n_mean
    dt = st.mean_sum.dtype
    contrib = torch.where(mask.unsqueeze(-1), x.to(dt), torch.zeros((), dtype=dt,
                                                                    device=x.device))
    # The carried sum leads the cumsum: the same sequence of additions in any chunking.
    sums = torch.cat([st.mean_sum.unsqueeze(1), contrib], 1).cumsum(1)[:, 1:]  # [B, T, Lm]
    counts = st.mean_count.unsqueeze(1) + mask.long().cumsum(1)  # [B, T]
    n = counts.unsqueeze(-1).to(dt)
    thr = prog.leaf_thr[lo:].to(dt)
    ok = torch.where(prog.leaf_above[lo:], sums > thr * n, sums < thr * n)
    enough = counts.unsqueeze(-1) >= prog.mean_min_tokens
    fired = ok & enough & mask.unsqueeze(-1)
    st.mean_sum = sums[:, -1]
    st.mean_count = counts[:, -1]
    return fired, (sums / n.clamp(min=1)).to(x.dtype)


def drivers(prog: Program, ev: Evaluation, b: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each hit, the leaf furthest past its threshold (relative) and its compared value."""
    value = ev.leaf_value[b, t]  # [H, L]
    thr = prog.leaf_thr
    margin = torch.where(prog.leaf_above, value - thr, thr - value) / thr.abs().clamp(min=1e-6)
    member = prog.rule_leaves[r]  # [H, L]
    passed = member & ev.leaf_fired[b, t]
    use = torch.where(passed.any(-1, keepdim=True), passed, member)
    score = torch.where(use, margin.nan_to_num(nan=-math.inf), torch.full((), -math.inf,
                                                                        device=value.device))
    driver = score.argmax(-1)
    return driver, value.gather(1, driver.unsqueeze(1)).squeeze(1)
