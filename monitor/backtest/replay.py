"""Which requests a logged conversation was, as token ids: the plan of a backtest's forwards.

Part of the scan stage (read -> **scan** -> results -> summary/diff -> report); pure tokenizer
work, no model. Every assistant turn ``k`` of a conversation was once its own request, whose
token ids are exactly what ``Monitor.scan(messages[:k + 1])`` builds
(:func:`monitor.runtime.scan.scan_token_ids`): the chat template of the earlier messages with
the generation prompt (the *prompt*), then the turn's reply (the *response*).

In a causal model a position's residual depends only on the tokens up to it, and the policy
engine's state at a token depends only on the tokens before it in its scope. So when every
turn's request is a token-level prefix of the whole conversation's ids, **one** forward over
the whole conversation gives every turn's activations: each turn's response is a span of it,
each turn's prompt a prefix of the last turn's prompt. :func:`plan` checks that prefix property
per conversation (chat templates are usually prefix-stable, but tokenization can merge across a
boundary, e.g. a reply starting with a blank line after ``assistant\\n``) and falls back to
one forward row per turn, each exactly that turn's request, when it does not hold.

Conversations whose ids are longer than ``max_tokens`` (the model's context) are skipped with
a reason (a ``too_long`` :class:`~monitor.backtest.read.Problem` naming the length), not
windowed: a window would show the model a context it never saw.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from monitor.backtest.read import Conversation, Problem
from monitor.data import token_ids
from monitor.runtime.scan import ScanItem, scan_token_ids

ONE_FORWARD, PER_TURN = "one_forward", "per_turn"


@dataclass(frozen=True)
class Row:
    """One forward row. ``ids``: its token ids; the ``prompt`` scope is one stream over
    ``[0, prompt_end)``; ``responses``: ``(message index, start, end)`` of each assistant turn
    whose reply is the span ``[start, end)``, each evaluated with fresh engine state."""

    ids: tuple[int, ...]
    prompt_end: int
    responses: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Replay:
    """How a conversation is scanned: ``rows`` (one for ``one_forward``; one per assistant turn,
    plus one for a trailing non-assistant message, for ``per_turn``). The last row's prompt
    stream covers the whole history before the last turn: its firing counts are the
    conversation's prompt counts. ``turn_ends[i]``: the token position where message ``i``
    ends in the whole conversation's template; ``tokens``: that template's length."""

    conv: Conversation
    rows: tuple[Row, ...]
    turn_ends: tuple[int, ...]
    tokens: int
    mode: str

    def turn_at(self, position: int) -> int:
        """The message holding token ``position`` of the conversation."""
        return min(bisect_right(self.turn_ends, position), len(self.turn_ends) - 1)


def template_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The chat template's token ids of ``messages`` (no generation prompt)."""
    return token_ids(tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=True))


def plan(tokenizer: Any, conv: Conversation, max_tokens: int, *, one_forward: bool = True) -> Replay | Problem:
    """The forward rows of ``conv`` (see the module doc), or a Problem: ``template`` (the chat
    template refused it) or ``too_long``. ``one_forward=False`` always plans one row per turn
    (the reference the one-forward plan is tested against)."""
    msgs = [dict(m) for m in conv.messages]
    last = len(msgs) - 1
    try:
        prompt, response = scan_token_ids(tokenizer, ScanItem(msgs))
        full = tuple(prompt + response)
        if len(full) > max_tokens:
            return _problem(conv, "too_long", f"{len(full)} tokens, more than the model's context of {max_tokens}; "
                                              "skipped (not windowed)")
        turns: dict[int, tuple[list[int], list[int]]] = {}
        for k, m in enumerate(msgs):
            if m["role"] == "assistant":
                turns[k] = (prompt, response) if k == last else scan_token_ids(tokenizer, ScanItem(msgs[:k + 1]))
        ends = tuple([sum(map(len, turns[k])) if k in turns else len(template_ids(tokenizer, msgs[:k + 1]))
                      for k in range(last)] + [len(full)])
    except Exception as exc:  # noqa: BLE001 - a template refusing a conversation is bad input
        return _problem(conv, "template", f"the chat template refused this conversation ({type(exc).__name__}: {exc})")
    stable = all(tuple(p + r) == full[:len(p) + len(r)] for p, r in turns.values())
    if one_forward and stable and list(ends) == sorted(ends):
        spans = tuple((k, len(p), len(p) + len(r)) for k, (p, r) in turns.items())
        return Replay(conv, (Row(full, len(prompt), spans),), ends, len(full), ONE_FORWARD)
    rows = [Row(tuple(p + r), len(p), ((k, len(p), len(p) + len(r)),)) for k, (p, r) in turns.items()]
    if last not in turns:  # a trailing user/tool message: the whole conversation is a prompt
        rows.append(Row(full, len(full), ()))
    if max(len(r.ids) for r in rows) > max_tokens:
        return _problem(conv, "too_long", f"a turn's request has more tokens than the model's context of "
                                          f"{max_tokens}; skipped (not windowed)")
    return Replay(conv, tuple(rows), ends, len(full), PER_TURN)


def _problem(conv: Conversation, kind: str, detail: str) -> Problem:
    return Problem(conv.key, conv.source, conv.line, kind, detail)
