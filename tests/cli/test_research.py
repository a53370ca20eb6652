"""Research commands: option errors before any model loads; names parsed strictly."""

from __future__ import annotations

import io

import pytest

from monitor.cli import main
from monitor.cli.research import parse_names
from monitor.errors import MonitorError


def test_parse_names():
    assert parse_names(["4711=unsafe_code.shell", " 3 = a.b "]) == {4711: "unsafe_code.shell", 3: "a.b"}
    for bad in ("4711", "x=a.b", "3=", "=a.b"):
        with pytest.raises(MonitorError, match="expected LATENT=NAME"):
            parse_names([bad])


@pytest.mark.parametrize("argv, message", [
    (["discover", "--data", "{tmp}/labeled.jsonl", "--name", "3=a.b"], "give --out CATALOG.yaml"),
    (["discover", "--data", "{tmp}/labeled.jsonl", "--out", "{tmp}/c.yaml"], "--out needs features"),
    (["discover", "--data", "{tmp}/labeled.jsonl", "--out", "{tmp}/c.yaml", "--name", "x=a.b"],
     "expected LATENT=NAME"),
])
def test_discover_rejects_bad_catalog_options_before_the_model_loads(argv, message, tmp_path,
                                                                       monkeypatch):
    import monitor.models

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(monitor.models, "load_model", no_model)
    (tmp_path / "labeled.jsonl").write_text('{"text": "x", "label": 1}\n')
    out, err = io.StringIO(), io.StringIO()
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv], out=out, err=err) == 2
    assert err.getvalue().startswith("sae-monitor: error: ") and message in err.getvalue()
    assert out.getvalue() == "" and len(err.getvalue().splitlines()) == 1


def test_eval_passes_its_options_to_run_eval(tmp_path, monkeypatch):
    import monitor.evaluation.run

    calls = []

    def fake_run_eval(data, **kwargs):
        calls.append((data, kwargs))
        if kwargs["progress"] is not None:
            kwargs["progress"](1, 2)
        return "TABLE\n"

    monkeypatch.setattr(monitor.evaluation.run, "run_eval", fake_run_eval)
    for name in ("labeled.jsonl", "benign.jsonl"):
        (tmp_path / name).write_text('{"text": "x", "label": 1}\n')
    out, err = io.StringIO(), io.StringIO()
    assert main(["eval", "--data", str(tmp_path / "labeled.jsonl"), "--benign", str(tmp_path / "benign.jsonl"),
                 "--group-by", "none", "--leave-one-out", "source", "--batch-size", "4", "--limit", "5"],
                out=out, err=err) == 0
    (data, kwargs), = calls
    assert data == str(tmp_path / "labeled.jsonl") and out.getvalue() == "TABLE\n"
    assert (kwargs["group_by"], kwargs["leave_one_out"], kwargs["benign"], kwargs["batch_size"],
            kwargs["limit"], kwargs["as_json"]) == (None, "source", str(tmp_path / "benign.jsonl"), 4, 5, False)
    assert "items 1/2" in err.getvalue()
    calls.clear()
    assert main(["eval", "--data", str(tmp_path / "labeled.jsonl"), "--no-progress"], out=out, err=err) == 0
    assert calls[0][1]["group_by"] == "source" and calls[0][1]["progress"] is None
    assert main(["eval", "--data", str(tmp_path / "labeled.jsonl"), "--benign", str(tmp_path / "nope.jsonl")],
                out=out, err=err) == 2
    assert "--benign" in err.getvalue() and "no such file or directory" in err.getvalue()
