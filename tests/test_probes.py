from __future__ import annotations

import random

import pytest
import torch
import yaml

from monitor.capture import capture
from monitor.catalog import Catalog, load_catalog
from monitor.discover import labeled_item
from monitor.errors import CatalogError, DataError
from monitor.probes import Probe, fit_logistic, fit_probe, probe_entry, probe_scores, save_probe
from monitor.stats import auroc
from monitor.testing import tiny_model, tiny_tokenizer
from tests.test_discover import POINT, words


def _planted(n: int, seed: int):
    """Features with very different scales and offsets; labels from a planted direction."""
    g = torch.Generator().manual_seed(seed)
    d = 12
    scale = torch.logspace(-1, 2, d)                     # 0.1 .. 100
    offset = torch.linspace(-50, 50, d)
    u = torch.randn(d, generator=torch.Generator().manual_seed(99))
    z = torch.randn(n, d, generator=g)
    logit = 4 * z @ u / u.norm()
    y = (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()
    x = z * scale + offset
    true_w = 4 * u / u.norm() / scale                   # the same logit in raw units
    true_b = -float(offset @ true_w)
    return x, y, true_w, true_b


def test_fit_logistic_recovers_planted_direction_in_raw_units():
    x, y, true_w, true_b = _planted(6000, seed=0)
    w, b = fit_logistic(x, y, l2=1e-4)
    cosine = float(torch.nn.functional.cosine_similarity(w * x.std(0), true_w * x.std(0), dim=0))
    assert cosine > 0.98                                 # compared in standardised units
    x_test, y_test, _, _ = _planted(2000, seed=1)
    ours = x_test @ w + b
    truth = x_test @ true_w + true_b
    assert float(torch.corrcoef(torch.stack([ours, truth]))[0, 1]) > 0.98
    assert float(auroc(ours, y_test)) == pytest.approx(float(auroc(truth, y_test)), abs=0.01)
    # calibrated, not just ranked: the folded logits match the planted ones in scale and offset
    assert float((ours - truth).abs().median()) < 0.5


def test_fit_logistic_weights_and_penalty():
    x, y, _, _ = _planted(500, seed=2)
    w_strong, _ = fit_logistic(x, y, l2=10.0)
    w_weak, _ = fit_logistic(x, y, l2=1e-4)
    sd = x.std(0)
    assert float((w_strong * sd).norm()) < 0.5 * float((w_weak * sd).norm())
    # weighting a duplicate half equals dropping it
    w_dup, b_dup = fit_logistic(torch.cat([x, x[:100]]), torch.cat([y, y[:100]]),
                                sample_weight=torch.cat([torch.ones(500), torch.zeros(100)]), l2=1e-2)
    w_ref, b_ref = fit_logistic(x, y, l2=1e-2)
    torch.testing.assert_close(w_dup, w_ref, rtol=1e-3, atol=1e-5)
    assert b_dup == pytest.approx(b_ref, rel=1e-3, abs=1e-4)
    with pytest.raises(ValueError):
        fit_logistic(x, y[:-1])


def test_save_probe_round_trips_through_the_catalog(tmp_path):
    w1, w2 = torch.randn(64), torch.randn(64)
    path = tmp_path / "cat.probes.safetensors"
    save_probe(path, "first", w1, 0.25)
    save_probe(path, "second", w2, -1.5)                 # keeps "first"
    probe = Probe(weight=w2, bias=-1.5, point=POINT, evidence={"auroc_heldout": 0.9})
    entries = [probe_entry("demo.first", "first", Probe(w1, 0.25, POINT)),
               probe_entry("demo.second", "second", probe, max_activation=3.0, description="d")]
    Catalog(sae="tiny", layer=0, features=tuple(entries)).save(tmp_path / "cat.yaml")
    catalog = load_catalog(tmp_path / "cat.yaml", sae_id="tiny")
    for name, w, b in (("demo.first", w1, 0.25), ("demo.second", w2, -1.5)):
        direction, bias = catalog.probe(name)
        torch.testing.assert_close(direction, w)
        assert bias == b
    catalog.check_probes(64)
    entry = catalog.get("demo.second")
    assert entry.evidence == {"auroc_heldout": 0.9} and entry.max_activation == 3.0
    assert "probes_file" not in yaml.safe_load((tmp_path / "cat.yaml").read_text())["features"][0]
    assert probe_entry("demo.x", "x", probe, max_activation=-2.0).max_activation is None
    with pytest.raises(CatalogError):
        save_probe(path, "bad", torch.zeros(2, 2), 0.0)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CatalogError, match="not a readable"):
        save_probe(tmp_path / "junk.safetensors", "k", w1, 0.0)


def _rows(n_pairs: int, seed: int = 0) -> list[dict]:
    """Positive responses contain 'Z'; each negative has 'Z' only in its prompt (out of scope)."""
    rng = random.Random(seed)
    rows = []
    for p in range(n_pairs):
        body = words(rng, 5)
        rows.append({"prompt": f"Q: {words(rng, 2)}\nA: ", "response": f"{body} Z {words(rng, 2)}",
                     "label": 1, "pair_id": f"p{p}"})
        rows.append({"prompt": f"Q: {words(rng, 2)} Z\nA: ", "response": f"{body} {words(rng, 2)}",
                     "label": 0, "pair_id": f"p{p}"})
    return rows


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model("llama"), tiny_tokenizer()


def test_fit_probe_on_a_model_separates_held_out_texts(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    items = [labeled_item(r) for r in _rows(24)]
    probe = fit_probe(model, tokenizer, items, POINT, l2=1e-3, holdout=0.25, seed=0)
    assert probe.weight.shape == (64,) and probe.weight.dtype == torch.float32
    assert probe.evidence["n_heldout"] == 12 and probe.evidence["n_train"] == 36
    assert probe.evidence["auroc_heldout"] == 1.0
    # the direction it found is the planted token's embedding, more than any other token's
    emb = model.get_input_embeddings().weight.detach()[:len(tokenizer)]
    assert int((emb @ probe.weight).argmax()) == tokenizer.convert_tokens_to_ids("Z")
    # probe_scores is the run-time rule: max over in-scope tokens of x @ w + b
    fresh = [labeled_item(r) for r in _rows(3, seed=5)]
    scores = probe_scores(model, tokenizer, fresh, POINT, probe.weight, probe.bias)
    for item, score in zip(fresh, scores):
        enc = tokenizer(item.text, return_offsets_mapping=True)
        resid = capture(model, torch.tensor([enc["input_ids"]]), POINT)[0]
        (s, e), = item.spans
        keep = [k for k, (a, b) in enumerate(enc["offset_mapping"]) if k > 0 and a < e and s < b]
        assert float(score) == pytest.approx(float(probe.score(resid[keep]).max()), abs=1e-4)
    assert float(auroc(scores, torch.tensor([i.label for i in fresh]))) == 1.0


def test_fit_probe_keeps_pairs_together_and_needs_both_labels(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    from monitor.probes import holdout_split

    items = [labeled_item(r) for r in _rows(10)]
    train, test = holdout_split(items, 0.3, seed=3)
    assert sorted(train + test) == list(range(20))
    pairs = lambda idx: {items[i].meta["pair_id"] for i in idx}  # noqa: E731
    assert not pairs(train) & pairs(test) and len(test) == 6
    with pytest.raises(DataError, match="both labels"):
        fit_probe(model, tokenizer, [i for i in items if i.label == 1], POINT, holdout=0)
