"""The behavioural pass reads each answer's features from the residuals computed while
generating; they must equal a teacher-forced measurement of the same transcripts."""

from __future__ import annotations

import torch

from monitor.drift import behaviour as beh
from monitor.drift import run as rn
from monitor.drift import teacher as tf
from monitor.drift.inputs import read_prompts
from tests.drift.conftest import LATENT


def test_answer_features_equal_teacher_forced_measurement(world):
    from monitor.drift.load import load, resolve

    prep = rn.prepare(world["base"], [world["pushed"]], prompts=world["prompts"], texts=world["texts"],
                      sae=world["sae"], catalog=world["catalog"], policies=world["policy"])
    columns, _, _ = rn.feature_columns(prep)
    model, tok = load(resolve(world["pushed"]), prep.base)
    shadow = beh.shadow_policy(prep.policy_set, prep.catalog, prep.sae.cfg.d_sae)
    prompts = read_prompts(world["prompts"])
    got = beh.answer(model, tok, prep.sae, shadow, prep.catalog, prompts, max_new_tokens=7,
                     passes=("greedy", "sampled"), batch_size=5, columns=columns)
    assert got.answer_features is not None
    items = [tf.Item(tuple(t.ids), len(t.prompt_ids)) for row in got.transcripts for t in row if t.response_ids]
    assert len(items) == got.answer_features.feature_mean.shape[0] > 12   # both passes, answers not empty
    want = tf.measure(model, tok, prep.sae, columns, items, batch_size=4)
    torch.testing.assert_close(got.answer_features.feature_mean, want.feature_mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.answer_features.feature_peak, want.feature_peak, atol=1e-4, rtol=1e-4)
    assert float(want.feature_peak[:, columns.latents.index(LATENT)].max()) > 1.0   # the pushed latent fires


def test_no_columns_no_features(world):
    from monitor.drift.load import load, resolve

    prep = rn.prepare(world["base"], [world["base"]], prompts=world["prompts"], texts=world["texts"],
                      sae=world["sae"], catalog=world["catalog"], policies=world["policy"])
    model, tok = load(resolve(world["base"]), prep.base)
    shadow = beh.shadow_policy(prep.policy_set, prep.catalog, prep.sae.cfg.d_sae)
    got = beh.answer(model, tok, prep.sae, shadow, prep.catalog, read_prompts(world["prompts"])[:3],
                     max_new_tokens=3, passes=("greedy",))
    assert got.answer_features is None
