from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    (tmp_path / "texts.jsonl").write_text('{"text": "hello"}\n')
    proc = subprocess.run([sys.executable, "-m", "monitor.cli", "sae-eval", "--texts", str(tmp_path / "texts.jsonl"),
                           "--sae", str(tmp_path / "missing-sae"), "--model", str(tmp_path / "no-model")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("sae-monitor: error:") and "config.json" in proc.stderr


@pytest.mark.parametrize("argv", [
    ["discover", "--data", "{tmp}/labeled.jsonl", "{tmp}/missing.jsonl"],
    ["explain", "7", "--texts", "{tmp}/missing.jsonl"],
    ["eval", "--data", "{tmp}/labeled.jsonl", "--train", "{tmp}/missing.jsonl"],
    ["serve", "--policies", "{tmp}/missing-policies"],
    ["policy", "check", "{tmp}/labeled.jsonl", "--catalog", "{tmp}/missing.jsonl"],
])
def test_a_missing_input_fails_before_the_model_loads(argv, tmp_path, capsys, monkeypatch):
    import monitor.models

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the input paths were checked")

    monkeypatch.setattr(monitor.models, "load_model", no_model)
    monkeypatch.setattr(monitor.models, "load_default_model", no_model)
    (tmp_path / "labeled.jsonl").write_text('{"text": "x", "label": 1}\n')
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sae-monitor: error: --") and "missing" in err and "no such file or directory" in err
