"""Shaping ``generate`` outputs after blocks: the same shapes the unwrapped model returns.

A blocked row keeps the response tokens before the one that fired, followed by the rule's
message. Rows are padded to a common width as ``generate`` pads finished rows, and the width
never exceeds what the unwrapped call could have returned (prompt + ``max_new_tokens``): a long
message is shortened rather than letting a block make other rows longer than the limit. When
the caller asked for ``scores``/``logits``, they get one entry per generated position again:
positions the monitor wrote (the message, padding) carry a one-hot distribution on the token
written there, so ``compute_transition_scores`` and friends keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from monitor.report import BlockInfo


def block_text(message: str, *, after_text: bool) -> str:
    """The rule's message, on its own paragraph when part of the response was already given."""
    return "\n\n" + message if after_text else message


def cut_sequences(sequences: torch.Tensor, prompt_len: int, blocks: Mapping[int, BlockInfo],
                  keep: Mapping[int, int], encode: Any, pad: int, max_width: int) -> tuple[torch.Tensor, dict[int, int]]:
    """``sequences[B, L]`` with every blocked row cut to ``prompt + keep[row]`` tokens and the
    message appended (``encode(text) -> list[int]``); width at most ``max_width``. When the
    kept tokens and the message do not both fit, the message wins: fewer response tokens are
    kept (the message alone is shortened only if it is longer than the whole budget).
    Also returns, per blocked row, the response index where the monitor's writing starts."""
    if not blocks:
        return sequences, {}
    rows = []
    written_from: dict[int, int] = {}
    for row in range(sequences.shape[0]):
        seq = sequences[row]
        if row in blocks:
            kept = max(0, keep.get(row, -1))
            budget = max_width - prompt_len
            message_ids = encode(block_text(blocks[row].message, after_text=kept > 0))
            if kept + len(message_ids) > budget:
                kept = max(0, budget - len(message_ids))
                message_ids = encode(block_text(blocks[row].message, after_text=kept > 0))
            message = torch.tensor(message_ids, dtype=seq.dtype, device=seq.device)
            written_from[row] = kept
            seq = torch.cat([seq[: prompt_len + kept], message])
        else:  # drop the padding generate added after this row finished; re-padded below
            seq = seq[: sequences.shape[1]]
        rows.append(seq[:max_width])
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad, dtype=sequences.dtype, device=sequences.device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, written_from


def align_step_outputs(out: Any, sequences: torch.Tensor, prompt_len: int, written_from: Mapping[int, int]) -> None:
    """Make ``out.scores`` / ``out.logits`` (tuples of ``[B, V]``, one per generated step)
    match ``sequences`` again: one entry per generated position; where the monitor wrote a
    row (from ``written_from[row]``, a response index, onwards) and past the steps the model
    ran, a one-hot entry on the token written there."""
    steps = sequences.shape[1] - prompt_len
    for name in ("scores", "logits"):
        entries = getattr(out, name, None)
        if not entries:
            continue
        entries = list(entries)[:steps]
        template = entries[-1]
        rebuilt = []
        for step in range(steps):
            entry = entries[step].clone() if step < len(entries) else torch.zeros_like(template)
            rows = [row for row, start in written_from.items() if step >= start]
            if step >= len(entries):
                rows = list(range(sequences.shape[0]))
            if rows:
                index = torch.tensor(rows, device=entry.device)
                one_hot = torch.full((len(rows), entry.shape[1]), float("-inf"), dtype=entry.dtype, device=entry.device)
                one_hot.scatter_(1, sequences[rows, prompt_len + step].reshape(-1, 1).to(entry.device), 0.0)
                entry[index] = one_hot
            rebuilt.append(entry)
        setattr(out, name, tuple(rebuilt))
