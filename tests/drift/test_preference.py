"""Pair preference on tiny models with known answers: a model fine-tuned toward the concept side
of some pairs prefers the concept side of *other* pairs more (increased), one fine-tuned toward
the contrast side less (decreased), an identical copy not at all; log-probabilities do not
depend on the batching; bad pair files are refused naming the file and line."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from monitor import testing as builders
from monitor.drift import DriftInputError
from monitor.drift import preference as pf
from monitor.drift import teacher as tf


def pair_rows(start: int, stop: int) -> list[dict]:
    rows = []
    for i in range(start, stop):
        for label, flag in ((1, "True"), (0, "False")):
            rows.append({"text": f"out{i} = run(request.args['cmd{i}'], shell={flag})\n", "label": label,
                         "pair_id": f"p{i}", "language": "python", "title": f"run command {i}"})
    return rows


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def finetuned(base, tokenizer, rows: list[dict], label: int, steps: int = 40):
    """A copy of ``base`` trained a few steps on the ``label`` side of ``rows``, wrapped as the
    preference check wraps them (a request line, then the fenced code)."""
    model = copy.deepcopy(base)
    items = [pf.encode_row(r, tokenizer) for r in rows if r["label"] == label]
    ids = torch.tensor([list(it.ids) for it in items])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def tiny():
    return builders.tiny_model(seed=3), builders.tiny_tokenizer()


def test_logprob_is_independent_of_batching_and_sums_token_logprobs(tiny):
    model, tok = tiny
    items = [tf.Item(tuple(tok(t)["input_ids"]), s) for t, s in
             (("a short one", 1), ("a slightly longer text here", 4), ("mid size", 2), ("x", 1))]
    one = pf.sequence_logprob(model, tok, items, batch_size=1)
    many = pf.sequence_logprob(model, tok, items, batch_size=4, max_batch_tokens=500)
    torch.testing.assert_close(many, one, atol=1e-4, rtol=1e-5)
    ids = torch.tensor([items[1].ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    manual = lp.gather(-1, ids[0, 1:, None])[3:].sum()   # tokens 4.. (predicted from position 3 on)
    assert float(one[1]) == pytest.approx(float(manual), abs=1e-3)
    assert float(one[3]) == 0.0                            # a one-token item has nothing to score


def test_finetune_toward_a_side_moves_held_out_pairs(tiny, tmp_path):
    base, tok = tiny
    train = pair_rows(0, 8)
    held_out = pf.read_pair_set(write(tmp_path / "held.jsonl", pair_rows(8, 20)), tok)
    assert held_out.n_pairs == 12 and held_out.items[0].score_from > 1
    base_lp = pf.sequence_logprob(base, tok, held_out.items)
    shifts = {}
    for name, model in (("concept", finetuned(base, tok, train, 1)), ("contrast", finetuned(base, tok, train, 0)),
                        ("copy", copy.deepcopy(base))):
        shifts[name] = pf.preference_shift(held_out, base_lp, pf.sequence_logprob(model, tok, held_out.items))
    up, down, same = shifts["concept"], shifts["contrast"], shifts["copy"]
    assert up.verdict == "increased" and up.delta > 1.0 and up.ci_low > 0 and up.share_up > 0.9
    assert down.verdict == "decreased" and down.delta < -1.0 and down.ci_high < 0
    assert same.verdict == "unchanged" and same.delta == 0.0 and same.p_value == 1.0
    assert up.pairs == 12 and up.name == "held"


def test_raw_items_score_the_code_from_its_second_token(tiny, tmp_path):
    _, tok = tiny
    raw = pf.read_pair_set(write(tmp_path / "p.jsonl", pair_rows(0, 2)), tok, wrap=False)
    assert [it.score_from for it in raw.items] == [1, 1, 1, 1]
    assert tok.decode(list(raw.items[0].ids)).startswith("out0 = run(")


def test_keep_and_limit_choose_pairs_and_incomplete_pairs_are_skipped(tiny, tmp_path):
    _, tok = tiny
    rows = pair_rows(0, 6) + [{"text": "alone", "label": 1, "pair_id": "lonely"}]
    path = write(tmp_path / "p.jsonl", rows)
    assert pf.read_pair_set(path, tok).n_pairs == 6
    assert pf.read_pair_set(path, tok, keep=lambda r: r["pair_id"] in ("p1", "p2")).n_pairs == 2
    assert pf.read_pair_set(path, tok, limit=3).n_pairs == 3


@pytest.mark.parametrize("content, words", [
    (None, "no such minimal-pair file"),
    ('{"text": "a", "label": 1, "pair_id": "x"}\n', "no minimal pairs"),
    ('{"text": "a", "label": 1, "pair_id": "x"}\n{"text": "b", "label": 0, "pair_id": "x"\n', r"p.jsonl:2: not valid JSON"),
    ('{"text": "a", "pair_id": "x"}\n', r"p.jsonl: row 1: a pair row needs"),
    ('{"text": "a", "label": "vulnerable", "pair_id": "x"}\n', r"p.jsonl: row 1: label 'vulnerable': use 1"),
])
def test_bad_pair_files_are_refused_naming_file_and_line(tiny, tmp_path, content, words):
    _, tok = tiny
    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DriftInputError, match=words):
        pf.read_pair_set(path, tok)


def test_drift_reports_the_preference_of_each_candidate(world, tmp_path):
    from monitor.drift import Options, drift
    from monitor.drift.load import load, resolve
    from monitor.drift.render import table
    from tests.drift.conftest import save

    base, tok = load(resolve(world["base"]), resolve(world["base"]))
    tuned = save(finetuned(base, tok, pair_rows(0, 8), 1), tok, tmp_path / "tuned")
    held_out = write(tmp_path / "held.jsonl", pair_rows(8, 20))
    result = drift(world["base"], [tuned, world["same"]], prompts=world["prompts"], texts=world["texts"],
                   sae=world["sae"], catalog=world["catalog"], policies=world["policy"], preferences=[held_out],
                   options=Options(max_new_tokens=6, passes=("greedy",), batch_size=6, contexts=0))
    up, same = (c.preferences[0] for c in result.candidates)
    assert up.verdict == "increased" and up.delta > 1.0 and up.pairs == 12
    assert same.verdict == "unchanged" and same.delta == 0.0
    data = result.to_dict()["candidates"][0]["preferences"][0]
    assert set(data) >= {"name", "pairs", "delta", "ci_low", "ci_high", "share_up", "base_margin", "p_value", "verdict"}
    assert "pair preference" in table(result) and result.exit_code == 0   # not a gate: rules are


def test_bad_preference_file_is_refused_before_model_work(world, tmp_path):
    from monitor.drift import Options, drift

    with pytest.raises(DriftInputError, match="no minimal pairs"):
        drift(world["base"], [world["same"]], prompts=world["prompts"], texts=world["texts"], sae=world["sae"],
              catalog=world["catalog"], policies=world["policy"],
              preferences=[write(tmp_path / "p.jsonl", [{"text": "a", "label": 1, "pair_id": "x"}])],
              options=Options(), models={str(world["base"]): (None, None)})
