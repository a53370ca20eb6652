"""Without vLLM installed, the adapter fails with one error naming the extra to install."""

from __future__ import annotations

import importlib.util

import pytest

from monitor.errors import MonitorError
from monitor.runtime.vllm import require_vllm, vllm_available


def test_missing_vllm_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert not vllm_available()
    with pytest.raises(MonitorError, match=r"pip install 'sae-monitor\[vllm\]'"):
        require_vllm()


def test_engine_choice(monkeypatch):
    from monitor.runtime.vllm import resolve_engine

    assert resolve_engine(None) == "transformers"
    assert resolve_engine("transformers") == "transformers"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert resolve_engine("auto") == "transformers"
    with pytest.raises(MonitorError, match=r"sae-monitor\[vllm\]"):
        resolve_engine("vllm")
    with pytest.raises(MonitorError, match="'transformers', 'vllm' or 'auto'"):
        resolve_engine("tgi")
