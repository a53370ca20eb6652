"""The ``sae-monitor`` parser and ``main``: commands, shared options, errors as one line."""

from __future__ import annotations

import importlib
import io
import json
import subprocess
import sys

import pytest

from monitor import __version__
from monitor.cli import main
from monitor.cli.app import COMMAND_MODULES, build_parser


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


def test_no_command_prints_help_to_the_given_stream():
    out, err = io.StringIO(), io.StringIO()
    assert main([], out=out, err=err) == 0
    assert out.getvalue().startswith("usage: sae-monitor") and err.getvalue() == ""
    for command in ("info", "demo", "train", "sae-eval", "discover", "explain", "eval", "serve",
                    "policy"):
        assert f"    {command} " in out.getvalue()


def test_every_command_module_registers_through_add_parser():
    for name in COMMAND_MODULES:
        assert callable(importlib.import_module(name).add_parser), name
    # a parser of only some modules has only their commands
    parser = build_parser(["monitor.cli.serve"])
    assert parser.parse_args(["serve"]).func.__name__ == "cmd_serve"
    with pytest.raises(SystemExit):
        parser.parse_args(["info"])


def test_shared_options_mean_the_same_in_every_command():
    parser = build_parser()
    discover = parser.parse_args(["discover", "--data", "x"])
    explain = parser.parse_args(["explain", "7"])
    for args in (discover, explain):
        assert (args.model, args.sae, args.dtype, args.batch_size, args.ctx) == (
            "default", "default", "bfloat16", 8, 256)
    evl = parser.parse_args(["eval", "--data", "x", "--json", "--catalog", "c.yaml", "--limit", "3"])
    assert (evl.json, evl.catalog, evl.limit, evl.model, evl.sae) == (True, "c.yaml", 3, "default", "default")
    test = parser.parse_args(["policy", "test", "p.yaml", "--catalog", "c.yaml"])
    assert (test.model, test.sae, test.catalog) == ("default", "default", "c.yaml")
