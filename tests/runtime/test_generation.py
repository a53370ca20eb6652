"""The monitored generate keeps the unwrapped model's contract, and nothing a block removes
reaches a caller (issue 13, items 1, 2 and 7)."""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from monitor.errors import MonitorError
from monitor.policy import CompiledPolicy
from monitor.runtime.hf import Monitor
from monitor.testing import compiled_policy, failing_sae, monitor_blocking_at, rule_yaml, tied_sae

GEN = dict(max_new_tokens=8, do_sample=False)


class Recorder(BaseStreamer):
    """A caller's streamer that records what it is given."""

    def __init__(self) -> None:
        self.prompt: list[int] | None = None
        self.tokens: list[int] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self.prompt is None:
            self.prompt = ids
        else:
            self.tokens.extend(ids)

    def end(self) -> None:
        self.ended = True


def blocking(setup):
    model, tok, prompt, plain = setup
    built = monitor_blocking_at(model, tok, plain, prompt.shape[1])
    if built is None:
        pytest.skip("no strictly new maximum in this trace")
    return built


def test_callers_streamer_never_receives_cut_tokens(setup):
    model, tok, prompt, plain = setup
    mon, index, _ = blocking(setup)
    message = tok("\n\nBLOCKED", add_special_tokens=False)["input_ids"]
    streamer = Recorder()
    out = mon.generate(prompt, pad_token_id=tok.pad_token_id, streamer=streamer, do_sample=False,
                       max_new_tokens=GEN["max_new_tokens"] + len(message))
    kept = plain[0, prompt.shape[1]:prompt.shape[1] + index].tolist()
    assert streamer.ended and streamer.prompt == prompt[0].tolist()
    assert streamer.tokens == kept + message  # never the firing token or anything after it
    assert out[0, prompt.shape[1]:].tolist()[:len(kept) + len(message)] == kept + message
    mon.close()


def test_callers_streamer_gets_everything_when_nothing_fires(setup):
    model, tok, prompt, plain = setup
    mon = Monitor(model, tok, sae=tied_sae(), policies=compiled_policy(rule_yaml()), self_test=False)
    streamer = Recorder()
    mon.generate(prompt, pad_token_id=tok.pad_token_id, streamer=streamer, **GEN)
    assert streamer.ended and streamer.tokens == plain[0, prompt.shape[1]:].tolist()
    mon.close()


def test_stream_never_releases_the_firing_token_while_the_block_is_being_recorded(setup, monkeypatch):
    """A slow consumer reading while the generating thread sits between the policy decision
    and the block being recorded must not see the firing token."""
    model, tok, prompt, plain = setup
    mon, index, _ = blocking(setup)
    original_step = CompiledPolicy.step

    def slow_step(self, state, feats, mask, scope, **kwargs):
        result = original_step(self, state, feats, mask, scope, **kwargs)
        if result.hits:
            time.sleep(0.4)  # the decision is made, the block not yet recorded
        return result

    original_decode = tok.decode

    def slow_decode(*args, **kwargs):
        time.sleep(0.05)  # the consumer lags behind the generating thread
        return original_decode(*args, **kwargs)

    monkeypatch.setattr(CompiledPolicy, "step", slow_step)
    monkeypatch.setattr(tok, "decode", slow_decode)
    text = "".join(mon.stream(prompt, **GEN))
    firing = original_decode(plain[0, prompt.shape[1]:prompt.shape[1] + index + 1], skip_special_tokens=True)
    allowed = original_decode(plain[0, prompt.shape[1]:prompt.shape[1] + index], skip_special_tokens=True)
    assert not text.startswith(firing) or firing == allowed
    assert text.endswith("BLOCKED")
    mon.close()


def test_fail_open_stream_serves_the_whole_reply(setup):
    model, tok, prompt, plain = setup
    sae = failing_sae("raise")
    mon = Monitor(model, tok, sae=sae, policies=compiled_policy(rule_yaml()), on_error="open", self_test=False)
    text = "".join(mon.stream(prompt, **GEN))
    assert text == tok.decode(plain[0, prompt.shape[1]:], skip_special_tokens=True)
    assert mon.last_report.outcome == "failed_open"
    mon.close()


def test_blocked_batch_keeps_widths_within_max_new_tokens(setup):
    model, tok, prompt, _ = setup
    batch = torch.cat([prompt, torch.tensor([[3, 8, 21, 60, 11, 2]])])
    long_message = "BLOCKED " * 6  # longer than the 8-token budget in byte tokens
    policy = compiled_policy(rule_yaml(above=-1.0, scope="prompt",
                                       actions=f"[{{block: {{message: '{long_message}'}}}}]"))
    mon = Monitor(model, tok, sae=tied_sae(), policies=policy, self_test=False)
    out = mon.generate(batch, pad_token_id=tok.pad_token_id, **GEN)
    assert out.shape[1] == batch.shape[1] + GEN["max_new_tokens"]  # the message fills the budget
    message = tok(long_message, add_special_tokens=False)["input_ids"][:GEN["max_new_tokens"]]
    assert out[:, batch.shape[1]:].tolist() == [message, message]
    mon.close()


def test_beam_search_is_refused_with_the_reason(setup):
    model, tok, prompt, _ = setup
    mon = Monitor(model, tok, sae=tied_sae(), policies=compiled_policy(rule_yaml()), self_test=False)
    with pytest.raises(MonitorError, match="beam search"):
        mon.generate(prompt, pad_token_id=tok.pad_token_id, num_beams=2, max_new_tokens=4)
    mon.close()


def test_num_return_sequences_monitors_every_sequence(setup):
    model, tok, prompt, _ = setup
    mon = Monitor(model, tok, sae=tied_sae(), policies=compiled_policy(rule_yaml(above=-1.0, actions="[log]")),
                  self_test=False)
    torch.manual_seed(0)
    out = mon.generate(prompt, pad_token_id=tok.pad_token_id, do_sample=True, num_return_sequences=3,
                       max_new_tokens=5)
    assert out.shape[0] == 3
    report = mon.last_report
    assert len(report.row_outcomes) == 3 and {h.row for h in report.hits} == {0, 1, 2}
    mon.close()


def test_inputs_keyword_and_generation_config_dict(setup):
    model, tok, prompt, plain = setup
    mon = Monitor(model, tok, sae=tied_sae(), policies=compiled_policy(rule_yaml()), self_test=False)
    assert torch.equal(mon.generate(inputs=prompt, pad_token_id=tok.pad_token_id, **GEN), plain)
    config = GenerationConfig(return_dict_in_generate=True, max_new_tokens=8, do_sample=False,
                              pad_token_id=tok.pad_token_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = mon.generate(prompt, generation_config=config)
    assert torch.equal(out.sequences, plain)
    assert not [w for w in caught if "generation" in str(w.message).lower()]
    assert config.return_dict_in_generate is True  # the caller's config is not modified
    mon.close()


def test_blocked_dict_output_has_one_score_per_generated_token(setup):
    model, tok, prompt, plain = setup
    mon, _, _ = blocking(setup)
    out = mon.generate(prompt, pad_token_id=tok.pad_token_id, return_dict_in_generate=True,
                       output_scores=True, do_sample=False, max_new_tokens=20)
    assert mon.last_report.blocks
    assert len(out.scores) == out.sequences.shape[1] - prompt.shape[1]
    written = out.sequences[0, prompt.shape[1]:]
    assert [int(s[0].argmax()) for s in out.scores] == written.tolist()
    mon.close()


def test_concurrent_scan_with_raise_behaviour_is_not_affected(setup):
    """scan() never raises for blocks and never flips the shared block_behavior."""
    model, tok, prompt, plain = setup
    mon = Monitor(model, tok, sae=tied_sae(), policies=compiled_policy(rule_yaml(above=-1.0)),
                  block_behavior="raise", self_test=False)
    errors: list[BaseException] = []

    def scanning() -> None:
        for _ in range(5):
            mon.scan(tok.decode(plain[0]))

    worker = threading.Thread(target=scanning)
    worker.start()
    for _ in range(3):
        try:
            mon.generate(prompt, pad_token_id=tok.pad_token_id, **GEN)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    worker.join()
    assert len(errors) == 3 and all(type(e).__name__ == "Blocked" for e in errors)
    mon.close()
