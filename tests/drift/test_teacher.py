"""Teacher-forced measurement: per-item results do not depend on the batching (length buckets,
a mask only for padded batches), and the per-item latent peaks are the encodings' maxima."""

from __future__ import annotations

import torch

from monitor.drift import run as rn
from monitor.drift import teacher as tf
from monitor.drift.load import load


def test_measure_is_independent_of_batching(world):
    prep = rn.prepare(world["base"], [world["same"]], prompts=world["prompts"], texts=world["texts"],
                      sae=world["sae"], catalog=world["catalog"], policies=world["policy"], directions=())
    columns, _, _ = rn.feature_columns(prep)
    model, tok = load(prep.base, prep.base)
    texts = [t for t in prep.texts] + ["short", "a slightly longer one", "short"]
    items = [tf.Item(tuple(tok(t)["input_ids"]), 1) for t in texts]
    one = tf.measure(model, tok, prep.sae, columns, items, batch_size=1)
    many = tf.measure(model, tok, prep.sae, columns, items, batch_size=6, max_batch_tokens=200)
    for name in ("latent_mean", "latent_peak", "feature_mean", "feature_peak", "n_tokens", "lens_mean"):
        torch.testing.assert_close(getattr(many, name), getattr(one, name), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(many.sum_x, one.sum_x, atol=1e-4, rtol=1e-5)
    # the peak of a latent over an item is the maximum of its encoding over the scored tokens
    ids = torch.tensor([items[0].ids])
    from monitor.capture import forward_through

    got: list[torch.Tensor] = []
    forward_through(model, {prep.sae.hook_point: lambda r: got.append(r.detach())}, input_ids=ids)
    acts = prep.sae.encode(got[0][0, 1:])
    torch.testing.assert_close(one.latent_peak[0], acts.amax(0).clamp_min(0), atol=1e-5, rtol=1e-4)
    assert float(one.latent_peak.max()) > 0
