"""Mapping vLLM's flattened token batch back to requests, positions and scopes (pure).

vLLM runs every scheduled request of a step in one forward pass over a flat token axis:
request ``i`` (in the model runner's input-batch order) owns rows
``query_start_loc[i]:query_start_loc[i + 1]``, and ``positions[row]`` is the row's absolute
position in its request. That one layout covers every case the monitor must handle:

* **prefill** — rows at positions ``0..n-1`` (the whole prompt, or with chunked prefill one
  chunk of it per step);
* **decode** — one row per request at position ``len(prompt) + k`` (response token ``k``);
* **preemption with recomputation** — a request that lost its KV cache is prefilled again
  from position 0 over prompt *and* already generated tokens. Those positions were monitored
  before: they must not be stepped again (windows and token counts would double), but their
  recorded steering edits must be applied again so that the recomputed cache is the one the
  request had;
* **padding** — with CUDA graphs the batch is padded past the last scheduled token; rows past
  ``query_start_loc[-1]`` belong to no request.

:func:`plan_step` turns that layout into :class:`Span` values (one per request and scope),
each saying which rows to encode and step, and which rows are replays. It never touches a
tensor on the accelerator: the inputs are the host-side copies vLLM already keeps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Scope = Literal["prompt", "response"]


@dataclass(frozen=True)
class Span:
    """Rows ``[row_start, row_end)`` of one request in one scope, at consecutive positions.

    ``position`` is the absolute position of ``row_start``; ``token_index`` the index of that
    row's token within its scope (``position`` for the prompt, ``position - prompt_len`` for
    the response). ``replay`` spans were monitored in an earlier step (recomputation after
    preemption): they are not stepped again, only their recorded edits are re-applied.
    ``ends_prompt`` is True when the span's last row is the prompt's last token.
    """

    req_id: str
    scope: Scope
    row_start: int
    row_end: int
    position: int
    token_index: int
    replay: bool
    ends_prompt: bool

    @property
    def length(self) -> int:
        return self.row_end - self.row_start


def plan_step(req_ids: Sequence[str], num_tokens: Mapping[str, int], first_positions: Sequence[int],
              prompt_lens: Mapping[str, int], monitored_upto: Mapping[str, int]) -> list[Span]:
    """Split one forward pass into spans (see the module docstring).

    ``req_ids``: requests in input-batch order; ``num_tokens[req]``: its rows this step (0 if
    not scheduled); ``first_positions[i]``: position of request ``i``'s first row;
    ``prompt_lens[req]``: prompt length, for monitored requests only (others are skipped);
    ``monitored_upto[req]``: positions ``< this`` were already monitored (0 for a new
    request). Spans come in row order.
    """
    spans: list[Span] = []
    row = 0
    for i, req in enumerate(req_ids):
        n = int(num_tokens.get(req, 0))
        if n <= 0:
            continue
        if req not in prompt_lens:
            row += n
            continue
        pos0 = int(first_positions[i])
        prompt_len = int(prompt_lens[req])
        done = int(monitored_upto.get(req, 0))
        # cut points: the already-monitored boundary and the prompt/response boundary
        cuts = sorted({pos0, pos0 + n, *(c for c in (done, prompt_len) if pos0 < c < pos0 + n)})
        for lo, hi in zip(cuts, cuts[1:]):
            scope: Scope = "prompt" if lo < prompt_len else "response"
            spans.append(Span(req, scope, row + lo - pos0, row + hi - pos0, lo,
                              lo if scope == "prompt" else lo - prompt_len,
                              replay=hi <= done, ends_prompt=hi == prompt_len))
        row += n
    return spans
