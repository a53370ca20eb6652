"""monitor.evaluate keeps the names the CLI and users import; the overhead benchmark's smoke run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_old_import_paths_still_work():
    import warnings

    import monitor.evaluate as old
    from monitor import evaluation

    assert old.run_eval is evaluation.run_eval and old.evaluate is evaluation.evaluate
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import importlib

        import monitor.baselines as moved
        importlib.reload(moved)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    from monitor.evaluation.baselines import fit_pooled_probe

    assert moved.fit_pooled_probe is fit_pooled_probe


def test_overhead_benchmark_tiny_smoke(tmp_path, capsys, monkeypatch):
    """Not timed: the --tiny path runs end to end and prints every figure."""
    spec = importlib.util.spec_from_file_location("overhead", ROOT / "benchmarks" / "overhead.py")
    overhead = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "overhead", overhead)  # dataclasses look their module up
    spec.loader.exec_module(overhead)
    out = tmp_path / "o.json"
    result = overhead.main(["--tiny", "--repeats", "1", "--new-tokens", "2", "--latents", "20",
                            "--batch", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| unmonitored | – | – | 1 |" in printed and "| synthetic 20 latents | 20 | 2 | 2 |" in printed
    assert "judge" in printed
    assert {r["configuration"] for r in result["rows"]} == {"unmonitored", "synthetic 20 latents"}
    assert all(r["tokens_per_second"] > 0 for r in result["rows"])
    assert json.loads(out.read_text())["judge"][0]["ms_per_response"] > 0
