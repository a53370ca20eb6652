from __future__ import annotations

import json
import subprocess
import sys

from monitor import __version__
from monitor.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert __version__ in capsys.readouterr().out


def test_info_json_reports_presence(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["default model"]["value"] == "SmolLM2-135M-Instruct"
    assert info["gguf"]["status"] in ("present", "missing")
    assert info["policies"]["status"] == "present"


def test_monitor_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "monitor.cli", "sae-eval", "--texts", str(tmp_path / "none.jsonl"),
                           "--sae", str(tmp_path / "missing-sae"), "--model", str(tmp_path / "no-model")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("sae-monitor: error:") and "config.json" in proc.stderr
