from __future__ import annotations

import json
import random

import pytest
import torch

from monitor.capture import HookPoint, capture
from monitor.catalog import Catalog, load_catalog
from monitor.discover import (DiscoveryResult, LabeledText, discover, labeled_item, load_discovery_items,
                              max_activations, merge_into_catalog, score_latents, to_catalog_entries,
                              transfer)
from monitor.errors import CatalogError, DataError
from monitor.testing import random_sae, tiny_model, tiny_tokenizer

# The planted SAE reads the embeddings (block 0's input), where each token's residual is its own
# embedding row. Latent 3 fires only on the token "Z" (value 5), latent 5 only on "Q", latent 7
# only on "K"; the other latents are random.
POINT = HookPoint(0, "resid_pre")
PLANTED = {3: "Z", 5: "Q", 7: "K"}
VALUE = 5.0


def planted_sae(model, tokenizer, d_sae: int = 16):
    sae = random_sae("relu", d_in=64, d_sae=d_sae, hook_name=POINT.name)
    emb = model.get_input_embeddings().weight.detach()
    with torch.no_grad():
        for latent, token in PLANTED.items():
            e = emb[tokenizer.convert_tokens_to_ids(token)]
            sae.W_enc[:, latent] = 2 * VALUE * e / e.dot(e)
            sae.b_enc[latent] = -VALUE
    return sae


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 5))) for _ in range(n))


def dialogue_rows(n_pairs: int = 6, seed: int = 0) -> list[dict]:
    """Pairs of rows: the positive response contains 'Z'; the negative has 'Z' only in the prompt
    (out of scope) and 'K' in its response. 'Q' appears in every response."""
    rng = random.Random(seed)
    rows = []
    for p in range(n_pairs):
        body = words(rng, 4) + " Q " + words(rng, 3)
        rows.append({"prompt": f"User: {words(rng, 3)}\nAssistant: ", "response": body + " Z " + words(rng, 2),
                     "label": 1, "category": "demo", "source": "a/one:x" if p % 2 else "b/two:y",
                     "pair_id": f"p{p}"})
        rows.append({"prompt": f"User: {words(rng, 3)} Z\nAssistant: ", "response": body + " K " + words(rng, 2),
                     "label": 0, "category": "demo", "source": "a/one:x" if p % 2 else "b/two:y",
                     "pair_id": f"p{p}"})
    return rows


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    return model, tokenizer, planted_sae(model, tokenizer)


# ------------------------------------------------------------------ pure scoring


def test_score_latents_exact_values():
    labels = torch.tensor([1, 1, 1, 0, 0])
    pooled = torch.tensor([[3.0, 0.0, 1.0, 2.0],
                           [2.0, 1.0, 1.0, 0.0],
                           [0.0, 0.0, 1.0, 0.0],
                           [1.0, 2.0, 1.0, 0.0],
                           [0.0, 0.0, 1.0, 5.0]])
    s = score_latents(pooled, labels, pair_ids=["a", "b", None, "a", "b"])
    # latent 0: pos {3,2,0} vs neg {1,0}: wins 2+2+0.5 = 4.5 of 6
    # latent 1: pos {0,1,0} vs neg {2,0}: 0.5 + 1 + 0.5 = 2 of 6
    # latent 2: all tied -> 0.5; latent 3: pos {2,0,0} vs neg {0,5}: 1 + 0.5 + 0.5 = 2 of 6
    assert s.auroc.tolist() == pytest.approx([4.5 / 6, 2 / 6, 0.5, 2 / 6])
    assert s.fire_pos.tolist() == pytest.approx([2 / 3, 1 / 3, 1.0, 1 / 3])
    assert s.fire_neg.tolist() == pytest.approx([0.5, 0.5, 1.0, 0.5])
    assert s.gap.tolist() == pytest.approx([5 / 3 - 0.5, 1 / 3 - 1.0, 0.0, 2 / 3 - 2.5])
    # pairs a = (0, 3), b = (1, 4): latent 0 wins both, latent 1 loses a and wins b, latent 2 ties
    assert s.n_pairs == 2
    assert s.pair_win.tolist() == pytest.approx([1.0, 0.5, 0.5, 0.5])
    assert s.rank(4).tolist() == [0, 2, 1, 3]          # 1 and 3 tie on AUROC; 1 has the larger gap
    assert s.rank(1, "negative").tolist() == [3]        # AUROC 1/3 with the most negative gap
    assert s.rank(2, "both").tolist() == [0, 3]


def test_score_latents_needs_both_labels():
    with pytest.raises(DataError, match="both labels"):
        score_latents(torch.zeros(3, 2), torch.tensor([1, 1, 1]))


# ------------------------------------------------------------------ discovery on a model


def test_discover_ranks_the_planted_latent_first_and_respects_scope(setup):
    model, tokenizer, sae = setup
    items = [labeled_item(r) for r in dialogue_rows()]
    result = discover(model, tokenizer, sae, items, top=5)
    assert result.ranked[0] == 3
    assert float(result.scores.auroc[3]) == 1.0
    assert float(result.scores.pair_win[3]) == 1.0
    assert float(result.scores.fire_pos[3]) == 1.0 and float(result.scores.fire_neg[3]) == 0.0
    assert float(result.scores.auroc[5]) == 0.5          # 'Q' is in every response
    assert float(result.scores.auroc[7]) == 0.0          # 'K' only in negative responses
    assert result.scores.rank(1, "negative").tolist() == [7]
    # The pooled value is the max over in-scope tokens, here exactly the planted activation.
    assert result.pooled[:, 3].tolist() == pytest.approx([VALUE, 0.0] * 6, abs=1e-4)
    # Scoring the whole text instead of the response: every text has a 'Z', latent 3 is useless.
    everything = [labeled_item(r, scope="all") for r in dialogue_rows()]
    assert float(discover(model, tokenizer, sae, everything).scores.auroc[3]) == 0.5


def test_pooled_matches_bruteforce_encoding(setup):
    model, tokenizer, sae = setup
    items = [labeled_item(r) for r in dialogue_rows(2)]
    result = discover(model, tokenizer, sae, items)
    for i, item in enumerate(items):
        enc = tokenizer(item.text, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        acts = sae.encode(capture(model, ids, POINT)[0])
        (s, e), = item.spans
        keep = [k for k, (a, b) in enumerate(enc["offset_mapping"]) if k > 0 and a < e and s < b]
        torch.testing.assert_close(result.pooled[i], acts[keep].amax(0).clamp_min(0))


def test_table_and_dict(setup):
    model, tokenizer, sae = setup
    result = discover(model, tokenizer, sae, [labeled_item(r) for r in dialogue_rows()], top=3)
    md = result.table("markdown")
    lines = md.splitlines()
    assert lines[0].startswith("| # | latent | AUROC | pair win |")
    assert lines[2].startswith("| 1 | 3 | 1.000 | 1.000 | 100.0% | 0.0% |")
    assert len([line for line in lines if line.startswith("| ")]) == 1 + 3
    term = result.table("terminal")
    assert "AUROC" in term.splitlines()[0] and "\x1b" not in term
    data = result.to_dict()
    assert data["latents"][0]["latent"] == 3 and data["n_pos"] == 6 and data["n_pairs"] == 6
    json.dumps(data)


def test_max_activations(setup):
    model, tokenizer, sae = setup
    texts = ["abc Z def", "no such letter here", "Q and Q"]
    peaks = max_activations(model, tokenizer, sae, texts, [3, 5, 7])
    assert peaks[3] == pytest.approx(VALUE, abs=1e-4)
    assert peaks[5] == pytest.approx(VALUE, abs=1e-4)
    assert peaks[7] == 0.0
    # position 0 never counts: a text starting with the token gives nothing
    assert max_activations(model, tokenizer, sae, ["Zab"], [3])[3] == 0.0


# ------------------------------------------------------------------ generalisation


def _fake_result(pooled, labels, sources) -> DiscoveryResult:
    items = [LabeledText(text=f"t{i}", label=int(l), source=s) for i, (l, s) in enumerate(zip(labels, sources))]
    scores = score_latents(torch.tensor(pooled), torch.tensor(labels))
    return DiscoveryResult(point=POINT, items=items, pooled=torch.tensor(pooled), scores=scores,
                           ranked=scores.rank(3))


def test_transfer_picks_on_one_source_and_scores_on_another():
    # latent 0 separates in both sources; latent 1 separates only in A (with a larger gap there);
    # latent 2 separates only in B. Source C has only positives.
    labels = [1, 1, 0, 0, 1, 1, 0, 0, 1]
    sources = ["A"] * 4 + ["B"] * 4 + ["C"]
    pooled = [[1, 9, 0], [1, 9, 0], [0, 0, 0], [0, 0, 0],
              [1, 0, 2], [1, 3, 2], [0, 3, 0], [0, 0, 0], [1, 0, 0]]
    report = transfer(_fake_result(pooled, labels, sources), "A", top=2)
    assert report.latents.tolist() == [1, 0]
    assert report.fit_auroc.tolist() == [1.0, 1.0]
    assert report.test_auroc["B"].tolist() == [0.5, 1.0]
    assert report.oracle["B"] == (0, 1.0)
    assert "C" in report.skipped and "C" not in report.test_auroc
    table = report.table()
    assert "| 1 | 1.000 | 0.500 |" in table and "skipped C" in table
    json.dumps(report.to_dict())
    with pytest.raises(DataError, match="'C' \\(1/0\\)"):
        transfer(_fake_result(pooled, labels, sources), "C")


def test_transfer_on_model_sources(setup):
    model, tokenizer, sae = setup
    result = discover(model, tokenizer, sae, [labeled_item(r) for r in dialogue_rows()])
    report = transfer(result, "a/one", top=1)
    assert report.latents.tolist() == [3]
    assert report.test_auroc["b/two"].tolist() == [1.0]


# ------------------------------------------------------------------ catalog entries


def test_to_catalog_entries_round_trip(setup, tmp_path):
    model, tokenizer, sae = setup
    result = discover(model, tokenizer, sae, [labeled_item(r) for r in dialogue_rows()], top=4)
    peaks = max_activations(model, tokenizer, sae, [i.text for i in result.items], [3, 5, 7])
    entries = to_catalog_entries(result, {3: "demo.letter_z", 7: "demo.letter_k"}, "tiny", peaks,
                                 examples={3: ["… «Z» …"]})
    z, k = entries
    assert (z.name, z.latent, z.max_activation) == ("demo.letter_z", 3, pytest.approx(VALUE, abs=1e-3))
    assert z.evidence["auroc"] == 1.0 and z.evidence["pair_win_rate"] == 1.0
    assert z.evidence["firing_rate_pos"] == 1.0 and z.evidence["firing_rate_neg"] == 0.0
    assert z.evidence["mean_gap"] == pytest.approx(VALUE, abs=1e-3)
    assert z.evidence["examples"] == ["… «Z» …"] and z.evidence["sae"] == "tiny"
    assert k.max_activation == pytest.approx(VALUE, abs=1e-3)
    assert k.evidence["examples"] == []                     # 'K' never fires on a positive
    top = to_catalog_entries(result, 2, "tiny")
    assert [e.name for e in top] == ["demo.latent_3", f"demo.latent_{int(result.ranked[1])}"]
    assert top[0].max_activation is None
    assert "Z" in top[0].evidence["examples"][0]           # default example: the response text
    catalog = merge_into_catalog(entries, "tiny", POINT.layer)
    catalog.save(tmp_path / "cat.yaml")
    loaded = load_catalog(tmp_path / "cat.yaml", sae_id="tiny", d_sae=sae.cfg.d_sae)
    assert loaded == catalog
    renamed = merge_into_catalog(top, "tiny", POINT.layer, loaded)
    assert renamed.names == ("demo.letter_z", "demo.letter_k", "demo.latent_3",
                             f"demo.latent_{int(result.ranked[1])}")
    with pytest.raises(CatalogError, match="is for SAE 'tiny'"):
        merge_into_catalog(top, "other", POINT.layer, loaded)
    with pytest.raises(CatalogError, match="out of range"):
        to_catalog_entries(result, {99: "x.y"}, "tiny")
    with pytest.raises(CatalogError, match="Bad Name"):
        to_catalog_entries(result, {3: "Bad Name"}, "tiny")
    assert isinstance(catalog, Catalog)


# ------------------------------------------------------------------ loading


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_discovery_items(tmp_path):
    rows = dialogue_rows(3) + [{"text": "other", "label": 1, "category": "else"}]
    data = _write(tmp_path / "data.jsonl", rows)
    items = load_discovery_items(data=[data], category="demo")
    assert len(items) == 6 and all(i.spans for i in items)
    assert items[0].meta["pair_id"] == "p0" and items[0].source == "b/two"
    with pytest.raises(DataError, match="categories present: 'demo', 'else'"):
        load_discovery_items(data=[data], category="nope")
    pos = _write(tmp_path / "p.jsonl", [{"text": "a Z"}, {"text": "b Z"}, {"text": "c Z"}])
    neg = _write(tmp_path / "n.jsonl", [{"text": "a", "label": 1}, {"text": "b"}])
    paired = load_discovery_items(data=[data], category="demo", per_label=2, seed=1)
    assert sorted(i.label for i in paired) == [0, 0, 1, 1]
    assert len({i.meta["pair_id"] for i in paired}) == 2          # whole pairs were drawn
    items = load_discovery_items(positive=[pos], negative=[neg], per_label=2)
    assert sorted(i.label for i in items) == [0, 0, 1, 1]
    with pytest.raises(DataError, match="both labels"):
        load_discovery_items(positive=[pos], negative=[])
    with pytest.raises(DataError, match="either"):
        load_discovery_items(data=[data], positive=[pos])
