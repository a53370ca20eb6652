from __future__ import annotations

import threading

import pytest
import torch

from monitor.capture import HookPoint, capture
from monitor.policy import compile_policies, load_policies
from monitor.sae import SAE
from monitor.errors import Blocked, MonitorUnavailable
from monitor.runtime.hf import Monitor
from monitor.testing import failing_sae, rule_yaml, tied_sae
from monitor.testing import monitor_blocking_at as blocking_monitor

LAYER = 2
GEN = dict(max_new_tokens=8, do_sample=False)


def make_sae() -> SAE:
    return tied_sae(LAYER)


def policy(tmp_path, yaml_text: str, d_sae: int = 16):
    path = tmp_path / "p.yaml"
    path.write_text(yaml_text)
    return compile_policies(load_policies(path), None, d_sae=d_sae)


def rule(rule_id="r", latent=0, above=1e9, scope="response", actions="[log, {block: {message: BLOCKED}}]", mode="enforce"):
    return rule_yaml(rule_id, latent, above, scope, actions, mode)


def latent_trace(model, sae, sequence, latent=0):
    resid = capture(model, sequence, HookPoint(LAYER))
    return sae.encode(resid)[0, :, latent]


def monitor_blocking_at(model, tok, prompt, plain, tmp_path) -> tuple[Monitor, int, float]:
    """A Monitor whose block rule (latent 0 above ``thr``) first fires at response token
    ``index`` of the greedy ``plain`` (the shared builder; skips when this seed has none)."""
    built = blocking_monitor(model, tok, plain, prompt.shape[1], layer=LAYER)
    if built is None:
        pytest.skip("no strictly new maximum in this trace")
    return built


def test_quiet_policy_is_identical_to_unmonitored(setup, tmp_path):
    model, tok, prompt, plain = setup
    mon = Monitor(model, tok, sae=make_sae(), policies=policy(tmp_path, rule()), self_test=False)
    out = mon.generate(prompt, pad_token_id=tok.pad_token_id, **GEN)
    assert isinstance(out, torch.Tensor) and torch.equal(out, plain)
    report = mon.last_report
    assert report.outcome == "allowed" and not report.hits
    assert report.tokens_monitored["response"] == plain.shape[1] - prompt.shape[1]
    assert report.tokens_monitored["prompt"] == prompt.shape[1] - 1  # first position excluded
    trace = latent_trace(model, mon.sae, plain)
    assert report.peak("latent:0") == pytest.approx(float(trace[prompt.shape[1]:].max()), abs=1e-4)
    assert report.peak("latent:0", scope="prompt") == pytest.approx(float(trace[1:prompt.shape[1]].max()), abs=1e-4)
    dict_out = mon.generate(prompt, pad_token_id=tok.pad_token_id, return_dict_in_generate=True, **GEN)
    assert torch.equal(dict_out.sequences, plain)
    mon.close()


def test_block_cuts_before_the_token_that_fired(setup, tmp_path):
    model, tok, prompt, plain = setup
    mon, index, _ = monitor_blocking_at(model, tok, prompt, plain, tmp_path)
    message = tok("\n\nBLOCKED", add_special_tokens=False)["input_ids"]
    # room for the kept tokens and the whole message within max_new_tokens
    out = mon.generate(prompt, pad_token_id=tok.pad_token_id, do_sample=False,
                       max_new_tokens=GEN["max_new_tokens"] + len(message))
    report = mon.last_report
    assert report.outcome == "blocked" and report.blocks[0].token_index == index
    expected = plain[0, :prompt.shape[1] + index].tolist() + message
    assert out[0].tolist()[:len(expected)] == expected
    with pytest.raises(Blocked) as err:
        mon.block_behavior = "raise"
        mon.generate(prompt, pad_token_id=tok.pad_token_id, **GEN)
    assert err.value.report.blocks[0].rule_id == "r"
    mon.close()


def test_shadow_rule_reports_but_never_blocks(setup, tmp_path):
    model, tok, prompt, plain = setup
    mon = Monitor(model, tok, sae=make_sae(), policies=policy(tmp_path, rule(above=-1.0, mode="shadow")), self_test=False)
    out = mon.generate(prompt, pad_token_id=tok.pad_token_id, **GEN)
    assert torch.equal(out, plain)
    assert mon.last_report.hits and mon.last_report.outcome == "allowed"
    mon.close()


def test_prompt_block_skips_generation(setup, tmp_path):
    model, tok, prompt, plain = setup
    mon = Monitor(model, tok, sae=make_sae(), policies=policy(tmp_path, rule(above=-1.0, scope="prompt")), self_test=False)
    out = mon.generate(prompt, pad_token_id=tok.pad_token_id, **GEN)
    message = tok("BLOCKED", add_special_tokens=False)["input_ids"]
    assert out[0, prompt.shape[1]:prompt.shape[1] + len(message)].tolist() == message
    assert mon.last_report.blocks[0].scope == "prompt"
    mon.close()


def test_batch_only_offending_row_stops(setup, tmp_path):
    model, tok, prompt, _ = setup
    sae = make_sae()
    other = torch.tensor([[0, 0, 3, 8, 21, 60]])  # left padded
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    batch = torch.cat([prompt, other])
    kwargs = dict(attention_mask=mask, pad_token_id=tok.pad_token_id, **GEN)
    with torch.no_grad():
        plain = model.generate(batch, **kwargs)
    resid = capture(model, plain, HookPoint(LAYER), attention_mask=torch.cat([mask, torch.ones(2, plain.shape[1] - 6, dtype=torch.long)], 1))
    acts = sae.encode(resid)[..., 0]
    # pick a threshold only row 0 exceeds in its response
    r0, r1 = acts[0, 6:], acts[1, 6:]
    if not r0.max() > r1.max():
        pytest.skip("row 0 does not dominate for this seed")
    thr = float((r0.max() + r1.max()) / 2)
    mon = Monitor(model, tok, sae=sae, policies=policy(tmp_path, rule(above=thr)), self_test=False)
    out = mon.generate(batch, **kwargs)
    assert list(mon.last_report.blocks) == [0]
    assert out[1, :plain.shape[1]].tolist() == plain[1].tolist()
    mon.close()


def steer_rule(trigger_above: float):
    return rule(above=trigger_above, actions="[{steer: {latent: 0, clamp: 25.0, duration: rest_of_response}}]")


def test_steering_changes_output_and_matches_with_and_without_cache(setup, tmp_path):
    model, tok, prompt, plain = setup
    mon = Monitor(model, tok, sae=make_sae(), policies=policy(tmp_path, steer_rule(-1.0)), self_test=False)
    cached = mon.generate(prompt, pad_token_id=tok.pad_token_id, use_cache=True, **GEN)
    uncached = mon.generate(prompt, pad_token_id=tok.pad_token_id, use_cache=False, **GEN)
    assert mon.last_report.outcome == "steered"
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)
    mon.close()


def test_stream_never_yields_blocked_token(setup, tmp_path):
    model, tok, prompt, plain = setup
    mon, index, _ = monitor_blocking_at(model, tok, prompt, plain, tmp_path)
    chunks = list(mon.stream(prompt, **GEN))
    text = "".join(chunks)
    allowed = tok.decode(plain[0, prompt.shape[1]:prompt.shape[1] + index], skip_special_tokens=True)
    # an unfinished multi-byte character before the block is held back, never shown half
    shown = allowed.rstrip("\ufffd")
    assert text == shown + ("\n\nBLOCKED" if shown else "BLOCKED")
    # quiet policy: the stream is the whole response
    quiet = Monitor(model, tok, sae=mon.sae, policies=policy(tmp_path, rule()), self_test=False)
    mon.close()
    assert "".join(quiet.stream(prompt, **GEN)) == tok.decode(plain[0, prompt.shape[1]:], skip_special_tokens=True)
    quiet.close()


def test_threads_get_their_own_reports(setup, tmp_path):
    model, tok, prompt, plain = setup
    mon, index, thr = monitor_blocking_at(model, tok, prompt, plain, tmp_path)
    benign = torch.tensor([[1, 2, 3]])
    results = {}

    def worker(name, ids):
        for _ in range(3):
            mon.generate(ids, pad_token_id=tok.pad_token_id, **GEN)
            results.setdefault(name, []).append(mon.last_report)

    threads = [threading.Thread(target=worker, args=("a", prompt)), threading.Thread(target=worker, args=("b", benign))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.outcome == "blocked" and r.blocks[0].token_index == index for r in results["a"])
    with torch.no_grad():
        benign_plain = model.generate(benign, pad_token_id=tok.pad_token_id, **GEN)
    benign_blocked = latent_trace(model, mon.sae, benign_plain)[3:].max() > thr
    assert all((r.outcome == "blocked") == bool(benign_blocked) for r in results["b"])
    mon.close()


@pytest.mark.parametrize("broken", ["raise", "nan"])
def test_on_error_open_and_closed(setup, tmp_path, broken):
    model, tok, prompt, plain = setup
    sae = failing_sae(broken, LAYER)
    pol = policy(tmp_path, rule())
    opened = Monitor(model, tok, sae=sae, policies=pol, on_error="open", self_test=False)
    out = opened.generate(prompt, pad_token_id=tok.pad_token_id, **GEN)
    assert torch.equal(out, plain) and opened.last_report.outcome == "failed_open"
    opened.close()
    closed = Monitor(model, tok, sae=sae, policies=pol, self_test=False)  # auto: enforce rule -> closed
    with pytest.raises(MonitorUnavailable) as err:
        closed.generate(prompt, pad_token_id=tok.pad_token_id, **GEN)
    assert err.value.report.outcome == "error"
    closed.close()


def test_rule_that_raises_is_an_error(setup, tmp_path, monkeypatch):
    model, tok, prompt, _ = setup
    pol = policy(tmp_path, rule())
    mon = Monitor(model, tok, sae=make_sae(), policies=pol, on_error="closed", self_test=False)
    monkeypatch.setattr(type(pol), "step", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad rule")))
    with pytest.raises(MonitorUnavailable, match="bad rule"):
        mon.generate(prompt, pad_token_id=tok.pad_token_id, **GEN)
    mon.close()


def test_scan_matches_generation(setup, tmp_path):
    model, tok, prompt, plain = setup
    mon = Monitor(model, tok, sae=make_sae(), policies=policy(tmp_path, rule(above=0.5, actions="[log]")), self_test=False)
    mon.generate(prompt, pad_token_id=tok.pad_token_id, **GEN)
    live = [(h.scope, h.token_index) for h in mon.last_report.hits]
    prompt_text = tok.decode(prompt[0])
    report = mon.scan(tok.decode(plain[0, prompt.shape[1]:]), prompt=prompt_text)
    scanned = [(h.scope, h.token_index) for h in report.hits]
    if tok(prompt_text)["input_ids"] == prompt[0].tolist():
        assert scanned == live
    mon.close()


def test_close_restores_model(setup, tmp_path):
    model, tok, prompt, plain = setup
    mon = Monitor(model, tok, sae=make_sae(), policies=policy(tmp_path, steer_rule(-1.0)), self_test=False)
    mon.close()
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, pad_token_id=tok.pad_token_id, **GEN), plain)


def test_wrap_pipeline_is_drop_in(setup, tmp_path):
    from transformers import pipeline

    from monitor import wrap

    model, tok, prompt, plain = setup
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    text = tok.decode(prompt[0])
    expected = pipe(text, max_new_tokens=6, do_sample=False)
    wrapped = wrap(pipe, sae=make_sae(), policies=policy(tmp_path, rule(above=-1.0, actions="[log]")), self_test=False)
    got = wrapped(text, max_new_tokens=6, do_sample=False)
    assert got == expected
    assert wrapped.last_report.hits and wrapped.last_report.outcome == "allowed"
    blocking = wrap(pipe, sae=make_sae(), policies=policy(tmp_path, rule(above=-1.0)), self_test=False)
    out = blocking(text, max_new_tokens=12, do_sample=False)  # room for the message's 7 byte tokens
    assert out[0]["generated_text"].endswith("BLOCKED")


def test_special_tokens_and_first_position_are_excluded_unless_asked(setup, tmp_path):
    model, tok, _, _ = setup
    special = tok.convert_tokens_to_ids("<|im_start|>")
    prompt = torch.tensor([[5, special, 42, 99, special, 13]])
    quiet = policy(tmp_path, rule())
    default = Monitor(model, tok, sae=make_sae(), policies=quiet, self_test=False)
    default.generate(prompt, pad_token_id=tok.pad_token_id, max_new_tokens=1, do_sample=False)
    assert default.last_report.tokens_monitored["prompt"] == 3  # 6 minus position 0 and two specials
    default.close()
    everything = Monitor(model, tok, sae=make_sae(), policies=quiet, self_test=False, include_special_tokens=True)
    everything.generate(prompt, pad_token_id=tok.pad_token_id, max_new_tokens=1, do_sample=False)
    assert everything.last_report.tokens_monitored["prompt"] == 6
    everything.close()
