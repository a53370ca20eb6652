"""benchmarks/scan_speed.py: the --tiny path runs end to end (not timed) and its per-item check holds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_scan_speed_benchmark_tiny_smoke(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("scan_speed", ROOT / "benchmarks" / "scan_speed.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "scan_speed", bench)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny", "--chunks", "2", "--batch-size", "4", "--json", str(tmp_path / "s.json")])
    printed = capsys.readouterr().out
    modes = [r["mode"] for r in result["rows"]]
    assert modes[0] == "scan, one at a time" and "extraction, batched" in modes
    assert all(r["items_per_second"] > 0 for r in result["rows"]) and "| extraction, batched |" in printed
    assert result["items"] == 24 and result["peak_scale"] > 0
    assert result["peak_max_abs_diff"] <= 1e-5 * result["peak_scale"] + 1e-6   # batched equals one at a time
    assert (tmp_path / "s.json").is_file()
