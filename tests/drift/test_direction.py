"""Concept directions on tiny models with known answers: a candidate whose weights move the
residual along the pairs' direction is reported increased along it; one moved as far along an
orthogonal direction, or an identical copy, is not."""

from __future__ import annotations

import json

import pytest
import torch

from monitor.drift import DriftInputError, Options, drift
from monitor.drift import direction as dr
from monitor.drift import run as rn
from monitor.drift.load import load, resolve
from tests.drift.conftest import LAYER, save, tiny_biased

FAST = Options(max_new_tokens=6, passes=("greedy",), batch_size=6, contexts=0)
MOVE = 0.5   # residual norms of the tiny model are ~0.2


def write_pairs(path):
    rows = []
    for i in range(10):
        pid = f"p{i}"
        rows.append({"text": f"x{i} = run(request.args['cmd{i}'], shell=True)\n", "label": 1, "pair_id": pid,
                     "changed_lines": [f"x{i} = run(request.args['cmd{i}'], shell=True)"]})
        rows.append({"text": f"x{i} = run(['ls', safe_{i}], shell=False)\n", "label": 0, "pair_id": pid,
                     "changed_lines": [f"x{i} = run(['ls', safe_{i}], shell=False)"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def moved(world, tmp_path_factory):
    """The pairs file and three candidates: moved along its direction, moved orthogonally, a copy."""
    from monitor import testing as builders

    root = tmp_path_factory.mktemp("direction")
    pairs = write_pairs(root / "pairs.jsonl")
    prep = rn.prepare(world["base"], [world["same"]], prompts=world["prompts"], texts=world["texts"],
                      sae=world["sae"], catalog=world["catalog"], policies=world["policy"], directions=[pairs])
    base, tok = load(prep.base, prep.base)
    direction = dr.pair_direction(base, tok, prep.sae.hook_point, pairs)
    g = torch.Generator().manual_seed(5)
    other = torch.randn(direction.vector.shape[0], generator=g)
    other -= (other @ direction.vector) * direction.vector
    other /= other.norm()
    out = {"pairs": pairs, "direction": direction}
    for name, vec in (("along", direction.vector), ("orthogonal", other)):
        model = tiny_biased()
        with torch.no_grad():
            model.model.layers[LAYER - 1].mlp.down_proj.bias += MOVE * vec
        out[name] = save(model, builders.tiny_tokenizer(), root / name)
    return out


def test_pair_direction_separates_its_pairs(world, moved):
    d = moved["direction"]
    assert d.pairs == 10 and d.separation > 0
    assert d.vector.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_candidate_moved_along_the_direction_is_reported_increased(world, moved):
    result = drift(world["base"], [moved["along"], moved["orthogonal"], world["same"]], prompts=world["prompts"],
                   texts=world["texts"], sae=world["sae"], catalog=world["catalog"], policies=world["policy"],
                   directions=[moved["pairs"]], options=FAST)
    along, orthogonal, same = (c.directions[0] for c in result.candidates)
    assert along.verdict == "increased" and along.score > 1.0
    assert along.delta > 0.2 and along.ci_low > 0 and along.p_value < 0.01
    assert along.relative == pytest.approx(along.delta / along.separation)
    assert orthogonal.verdict != "increased" and abs(orthogonal.delta) < 0.25 * along.delta
    assert same.verdict == "unchanged" and same.delta == 0.0 and same.score == 0.0
    data = result.to_dict()["candidates"][0]["directions"][0]
    assert set(data) >= {"name", "delta", "relative", "ci_low", "ci_high", "t", "null_delta", "p_value", "verdict"}


def test_bad_pairs_file_is_refused_before_model_work(world, tmp_path):
    lonely = tmp_path / "lonely.jsonl"
    lonely.write_text(json.dumps({"text": "a", "label": 1, "pair_id": "x"}) + "\n")
    for path, words in ((tmp_path / "missing.jsonl", "no such"), (lonely, "no minimal pairs")):
        with pytest.raises(DriftInputError, match=words):
            drift(world["base"], [world["same"]], prompts=world["prompts"], texts=world["texts"],
                  sae=world["sae"], catalog=world["catalog"], policies=world["policy"], directions=[path],
                  options=FAST, models={str(world["base"]): (None, None)})
