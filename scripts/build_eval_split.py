"""The cross-source evaluation split behind docs/benchmarks.md's detection table.

    python scripts/build_eval_split.py      # writes runs/eval/eval.jsonl and runs/eval/train.jsonl
    sae-monitor eval --data runs/eval/eval.jsonl --train runs/eval/train.jsonl

Each category is evaluated on one source and the baselines are fitted on another, so every
number is a transfer measurement (balanced samples, seed 11).
"""
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def sample(path: Path, n: int, seed: int = 11) -> list[dict]:
    rows = [json.loads(line) for line in path.open()]
    random.Random(seed).shuffle(rows)
    return [r for r in rows if r["label"] == 1][:n // 2] + [r for r in rows if r["label"] == 0][:n // 2]


def main() -> None:
    evaluation = (sample(SHARED / "unsafe_code/juliet_c_pairs.jsonl", 150)
                  + sample(ROOT / "datasets/devsets/backdoor_prose.jsonl", 48)
                  + sample(SHARED / "sycophancy/anthropic_political_pairs.jsonl", 150))
    training = (sample(SHARED / "unsafe_code/sven_pairs.jsonl", 150)
                + sample(SHARED / "backdoor/juliet_c_pairs.jsonl", 150)
                + sample(SHARED / "sycophancy/truthfulqa_constructed_pairs.jsonl", 150))
    out = ROOT / "runs" / "eval"
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("eval", evaluation), ("train", training)):
        with (out / f"{name}.jsonl").open("w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
        print(name, len(rows))


if __name__ == "__main__":
    main()
