"""The flat-batch -> per-request span mapping (pure; runs without vLLM)."""

from __future__ import annotations

from monitor.runtime.vllm.batch import Span, plan_step


def test_prefill_of_two_requests_then_decode():
    spans = plan_step(["a", "b"], {"a": 5, "b": 3}, [0, 0], {"a": 5, "b": 3}, {})
    assert spans == [Span("a", "prompt", 0, 5, 0, 0, False, True), Span("b", "prompt", 5, 8, 0, 0, False, True)]
    spans = plan_step(["a", "b"], {"a": 1, "b": 1}, [5, 7], {"a": 5, "b": 3}, {"a": 5, "b": 7})
    assert spans == [Span("a", "response", 0, 1, 5, 0, False, False),
                     Span("b", "response", 1, 2, 7, 4, False, False)]


def test_chunked_prefill_marks_only_the_last_chunk_as_ending_the_prompt():
    first = plan_step(["a"], {"a": 4}, [0], {"a": 10}, {})
    middle = plan_step(["a"], {"a": 4}, [4], {"a": 10}, {"a": 4})
    last = plan_step(["a"], {"a": 2}, [8], {"a": 10}, {"a": 8})
    assert [s.ends_prompt for s in first + middle + last] == [False, False, True]
    assert [(s.position, s.token_index, s.length) for s in first + middle + last] == [(0, 0, 4), (4, 4, 4), (8, 8, 2)]


def test_recomputation_after_preemption_replays_monitored_positions_and_steps_only_new_ones():
    # prompt of 5, 3 response tokens monitored (positions 0..7), KV cache lost: 9 rows from 0
    spans = plan_step(["a"], {"a": 9}, [0], {"a": 5}, {"a": 8})
    assert spans == [Span("a", "prompt", 0, 5, 0, 0, True, True),
                     Span("a", "response", 5, 8, 5, 0, True, False),
                     Span("a", "response", 8, 9, 8, 3, False, False)]


def test_unmonitored_and_unscheduled_requests_take_no_span_but_keep_their_rows():
    spans = plan_step(["x", "idle", "a"], {"x": 3, "a": 2}, [0, 9, 4], {"a": 6}, {"a": 4})
    assert spans == [Span("a", "prompt", 3, 5, 4, 4, False, True)]


def test_a_chunk_crossing_the_prompt_end_splits_by_scope():
    spans = plan_step(["a"], {"a": 4}, [3], {"a": 5}, {"a": 3})
    assert [(s.scope, s.row_start, s.row_end, s.token_index) for s in spans] == [("prompt", 0, 2, 3), ("response", 2, 4, 0)]
