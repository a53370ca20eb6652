"""``sae-monitor serve``: the options reach serve_model; bad limits are usage errors."""

from __future__ import annotations

import io

import pytest

from monitor.cli import main


def test_serve_passes_options_and_only_the_limits_given(monkeypatch):
    import monitor.serve

    calls = []
    monkeypatch.setattr(monitor.serve, "serve_model", lambda model, **kw: calls.append((model, kw)))
    monkeypatch.setenv("SAE_MONITOR_ADMIN_TOKEN", "s3cret")
    out, err = io.StringIO(), io.StringIO()
    assert main(["serve", "--port", "9001", "--max-concurrent", "2", "--max-prompt-tokens", "512",
                 "--on-error", "closed", "--no-self-test"], out=out, err=err) == 0
    (model, kw), = calls
    assert model == "default" and kw["sae"] == "default" and kw["port"] == 9001
    assert (kw["max_concurrent"], kw["default_max_tokens"], kw["max_prompt_tokens"]) == (2, 256, 512)
    assert "max_tokens_limit" not in kw and "max_body_bytes" not in kw
    assert kw["on_error"] == "closed" and kw["self_test"] is False and kw["admin_token"] == "s3cret"


@pytest.mark.parametrize("flag", ["--max-concurrent", "--max-tokens", "--max-prompt-tokens"])
def test_a_limit_below_one_is_a_usage_error(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", flag, "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: '0': must be 1 or more" in err and "Traceback" not in err


def test_engine_vllm_without_vllm_names_the_extra():
    """In an environment without vLLM (the main one), ``--engine vllm`` fails before any model
    work with one line naming the extra to install."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this environment (tests/vllm covers serving with it)")
    out, err = io.StringIO(), io.StringIO()
    assert main(["serve", "--engine", "vllm", "--port", "1"], out=out, err=err) == 2
    assert "sae-monitor[vllm]" in err.getvalue() and "Traceback" not in err.getvalue()


def test_engine_is_passed_to_serve_model(monkeypatch):
    import monitor.serve

    calls = []
    monkeypatch.setattr(monitor.serve, "serve_model", lambda model, **kw: calls.append(kw))
    assert main(["serve", "--engine", "auto"], out=io.StringIO(), err=io.StringIO()) == 0
    assert calls[0]["engine"] == "auto" and "max_concurrent" not in calls[0]
