"""Planning a conversation's forwards: one row when every turn's request is a token prefix of
the whole conversation, one row per turn (each exactly ``Monitor.scan``'s ids) when not."""

from __future__ import annotations

from monitor.backtest.read import Conversation, Problem
from monitor.backtest.replay import ONE_FORWARD, PER_TURN, Replay, plan
from monitor.runtime.scan import ScanItem, scan_token_ids
from monitor.testing import tiny_tokenizer
from tests.backtest.helpers import CHAT_TEMPLATE

# Marks the conversation's final message: messages[:k + 1] renders turn k differently than the
# whole conversation does, so no turn but the last is a prefix of it.
LAST_MARKED = CHAT_TEMPLATE.replace("{{ m['role'] }}\n", "{{ m['role'] }}{% if loop.last %}*{% endif %}\n")


def tokenizer(template: str = CHAT_TEMPLATE):
    tok = tiny_tokenizer()
    tok.chat_template = template
    return tok


def conv(*contents: str, roles: tuple[str, ...] = ()) -> Conversation:
    roles = roles or tuple("user" if i % 2 == 0 else "assistant" for i in range(len(contents)))
    msgs = tuple({"role": r, "content": c} for r, c in zip(roles, contents))
    return Conversation("f:1", "c", msgs, "f", 1)


def scan_ids(tok, messages):
    prompt, response = scan_token_ids(tok, ScanItem(list(messages)))
    return prompt, response


def test_prefix_stable_conversation_is_one_row_holding_every_turns_request():
    tok = tokenizer()
    c = conv("hi", "hello", "rm -rf /?", "no", "why", "because")
    p = plan(tok, c, 1000)
    assert isinstance(p, Replay) and p.mode == ONE_FORWARD and len(p.rows) == 1
    (row,) = p.rows
    prompt, response = scan_ids(tok, c.messages)
    assert list(row.ids) == prompt + response and row.prompt_end == len(prompt) and p.tokens == len(row.ids)
    assert [k for k, _, _ in row.responses] == [1, 3, 5]
    for k, start, end in row.responses:  # each span is that turn's scan response, at its scan position
        tp, tr = scan_ids(tok, c.messages[:k + 1])
        assert (start, end) == (len(tp), len(tp) + len(tr)) and list(row.ids[:end]) == tp + tr
    assert p.turn_at(0) == 0 and p.turn_at(p.tokens - 1) == 5
    assert [p.turn_at(start) for _, start, _ in row.responses] == [1, 3, 5]


def test_unstable_template_falls_back_to_one_row_per_turn():
    tok = tokenizer(LAST_MARKED)
    c = conv("hi", "hello", "rm -rf /?", "no")
    p = plan(tok, c, 1000)
    assert isinstance(p, Replay) and p.mode == PER_TURN and len(p.rows) == 2
    for row, k in zip(p.rows, (1, 3)):
        tp, tr = scan_ids(tok, c.messages[:k + 1])
        assert list(row.ids) == tp + tr and row.prompt_end == len(tp)
        assert row.responses == ((k, len(tp), len(tp) + len(tr)),)
    assert plan(tokenizer(), c, 1000, one_forward=False).mode == PER_TURN  # the reference, on demand


def test_trailing_user_message_is_one_more_all_prompt_row_per_turn():
    tok = tokenizer(LAST_MARKED)
    c = conv("hi", "hello", "and now?")
    p = plan(tok, c, 1000)
    assert isinstance(p, Replay) and len(p.rows) == 2
    prompt, response = scan_ids(tok, c.messages)
    assert response == [] and list(p.rows[-1].ids) == prompt and p.rows[-1].prompt_end == len(prompt)
    assert p.rows[-1].responses == ()
    one = plan(tokenizer(), c, 1000)  # prefix-stable: one row, all of it prompt after the reply
    assert isinstance(one, Replay) and one.mode == ONE_FORWARD and one.rows[0].prompt_end == one.tokens


def test_too_long_is_a_problem_naming_the_length_and_that_it_is_skipped():
    tok = tokenizer()
    c = conv("x" * 200, "y")
    p = plan(tok, c, 128)
    assert isinstance(p, Problem) and p.kind == "too_long" and p.key == "f:1"
    assert p.detail.startswith(f"{len(sum(scan_ids(tok, c.messages), []))} tokens") and "not windowed" in p.detail


def test_a_template_that_refuses_is_a_problem():
    tok = tokenizer("{{ raise_exception('no system role') }}")
    p = plan(tok, conv("hi", "hello"), 1000)
    assert isinstance(p, Problem) and p.kind == "template" and "no system role" in p.detail
