"""Drift checks on tiny models with known answers (see conftest: the "pushed" candidate adds
PUSH x the encoder direction of latent LATENT to an MLP bias below the SAE's layer)."""

from __future__ import annotations

import json

import pytest
import torch

from monitor.drift import Options, drift
from tests.drift.conftest import LATENT, OTHER

FAST = Options(max_new_tokens=6, batch_size=6, top_k=5, contexts=2)


@pytest.fixture(scope="module")
def series(world):
    """One run over three candidates: the base itself, an identical copy, the pushed model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine one thread is many times faster
    try:
        return drift(world["base"], [world["base"], world["same"], world["pushed"]], prompts=world["prompts"],
                     texts=world["texts"], sae=world["sae"], catalog=world["catalog"], policies=world["policy"],
                     options=FAST)
    finally:
        torch.set_num_threads(threads)


def test_base_against_itself_reports_nothing(series):
    itself = series.candidates[0]
    assert [r.verdict for r in itself.rules] == ["unchanged", "unchanged"]
    assert all(r.delta == 0 and r.p_value == 1.0 for r in itself.rules)
    assert [f.verdict for f in itself.features] == ["unchanged", "unchanged"]
    assert itself.n_latents_up == itself.n_latents_down == 0
    assert itself.kl.mean == pytest.approx(0.0, abs=1e-6)
    assert itself.lens.norm == 0.0 and itself.drift_score == 0.0
    assert itself.fvu.candidate == pytest.approx(itself.fvu.base) and not itself.fvu.worse


def test_identical_copy_is_unchanged(series):
    same = series.candidates[1]
    assert all(r.verdict == "unchanged" for r in same.rules)
    assert all(f.verdict == "unchanged" for f in same.features)
    assert same.latents_up == () and same.latents_down == ()
    assert not same.enforce_increased


def test_pushed_latent_and_its_rule_are_reported_increased(series):
    pushed = series.candidates[2]
    rule = {r.id: r for r in pushed.rules}
    assert rule["pushed.fires"].verdict == "increased"
    assert rule["pushed.fires"].base_rate < 0.2 and rule["pushed.fires"].candidate_rate > 0.8
    assert rule["pushed.fires"].ci_low > 0 and rule["pushed.fires"].p_value < 0.01
    assert rule["other.fires"].verdict == "unchanged"
    feats = {f.name: f for f in pushed.features}
    assert feats["test.pushed"].verdict == "increased"
    assert feats["test.pushed"].delta > 3.0 and feats["test.pushed"].ci_low > 0
    assert feats["test.pushed"].candidate_response_peak > feats["test.pushed"].base_response_peak + 3.0
    # the pushed latent is the most-moved latent, named from the catalog, with contexts
    top = pushed.latents_up[0]
    assert (top.latent, top.name) == (LATENT, "test.pushed") and top.contexts
    # the difference lens points at it: the added direction is its decoder row (tied SAE)
    assert pushed.lens.top_latents[0].latent == LATENT and pushed.lens.top_latents[0].cosine > 0.9
    assert pushed.enforce_increased == ("pushed.fires",)
    assert pushed.drift_score > 1.0 > series.candidates[1].drift_score
    assert pushed.kl.mean > 0 and pushed.kl.ci_low > 0


def test_untouched_feature_does_not_move_beyond_the_null(series):
    other = {f.name: f for f in series.candidates[2].features}["test.other"]
    assert other.verdict == "unchanged" or abs(other.t) > series.candidates[2].null_t
    assert OTHER != LATENT


def test_exit_code_and_json_fields(series):
    assert series.exit_code == 1
    data = json.loads(json.dumps(series.to_dict()))
    cand = data["candidates"][2]
    assert set(cand["rules"][0]) >= {"id", "base_rate", "candidate_rate", "delta", "ci_low", "ci_high",
                                     "p_value", "verdict"}
    for key in ("features", "latents_up", "latents_down", "fvu", "kl", "lens", "drift_score"):
        assert key in cand
    assert "responses" not in cand and "contexts" not in cand["latents_up"][0]
    assert "base_responses" in series.to_dict(include_text=True)


def test_series_is_reported_in_order(series, world):
    assert [c.candidate for c in series.candidates] == [str(world["base"]), str(world["same"]), str(world["pushed"])]


def test_lora_adapter_with_zero_update_is_unchanged(world, tmp_path):
    """A freshly initialised LoRA adapter (B = 0) is the base: loaded through peft, no drift."""
    import peft
    from tests.drift.conftest import tiny_biased

    model = peft.get_peft_model(tiny_biased(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    result = drift(world["base"], [tmp_path / "adapter"], prompts=world["prompts"], texts=world["texts"],
                   sae=world["sae"], catalog=world["catalog"], policies=world["policy"],
                   options=Options(max_new_tokens=4, passes=("greedy",), batch_size=6, contexts=0))
    cand = result.candidates[0]
    assert all(r.verdict == "unchanged" for r in cand.rules)
    assert cand.kl.mean == pytest.approx(0.0, abs=1e-6) and result.exit_code == 0


def test_monitor_drift_is_callable_and_typed(series):
    import monitor
    import monitor.drift as package
    from monitor.drift import DriftResult

    assert callable(package) and package is monitor.drift and isinstance(series, DriftResult)
