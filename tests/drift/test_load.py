"""Bad input is refused before any model work, with one message naming the path and the mismatch."""

from __future__ import annotations

import json

import pytest
import torch

from monitor.drift import DriftInputError, drift
from monitor.drift import load as ld
from monitor import testing as builders
from tests.drift.conftest import save, tiny_biased


@pytest.fixture
def no_model_work(monkeypatch):
    """Any attempt to load weights fails the test: every refusal must come first."""
    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(ld, "load", refuse)


def run(world, candidate, **kwargs):
    args = dict(prompts=world["prompts"], texts=world["texts"], sae=world["sae"], catalog=world["catalog"],
                policies=world["policy"])
    args.update(kwargs)
    return drift(world["base"], [candidate], **args)


def refused(world, candidate, *fragments, **kwargs) -> str:
    with pytest.raises(DriftInputError) as info:
        run(world, candidate, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_different_architecture(world, tmp_path, no_model_work):
    path = save(builders.tiny_model("gpt2"), builders.tiny_tokenizer(), tmp_path / "gpt2")
    refused(world, path, str(path), "model_type", "'gpt2'", "'llama'")


def test_different_hidden_size(world, tmp_path, no_model_work):
    path = save(tiny_biased(hidden_size=32), builders.tiny_tokenizer(), tmp_path / "narrow")
    refused(world, path, str(path), "hidden_size is 32", "64")


def test_different_tokenizer(world, tmp_path, no_model_work):
    tok = builders.tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|trigger|>"]})
    path = save(tiny_biased(), tok, tmp_path / "othertok")
    refused(world, path, str(path), "tokenizer differs")


def test_lora_adapter_for_another_base(world, tmp_path, no_model_work):
    import peft
    other = tiny_biased(hidden_size=32)
    save(other, builders.tiny_tokenizer(), tmp_path / "other-base")
    adapter = peft.get_peft_model(other, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # recorded base unknown to us: the shapes alone must give it away
    cfg["base_model_name_or_path"] = "someone/other-model"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    refused(world, tmp_path / "adapter", str(tmp_path / "adapter"), "q_proj", "another base")
    # recorded base that exists locally: named in the message
    cfg["base_model_name_or_path"] = str(tmp_path / "other-base")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    refused(world, tmp_path / "adapter", str(tmp_path / "adapter"), str(tmp_path / "other-base"), "hidden_size")


def test_missing_checkpoint_directory(world, tmp_path, no_model_work):
    refused(world, tmp_path / "nowhere", str(tmp_path / "nowhere"), "no such model directory")


def test_half_written_checkpoint_without_weights(world, tmp_path, no_model_work):
    path = tmp_path / "half"
    save(tiny_biased(), builders.tiny_tokenizer(), path)
    (path / "model.safetensors").unlink()
    refused(world, path, str(path), "half-written", "no weights")


def test_truncated_weights_file(world, tmp_path, no_model_work):
    path = tmp_path / "truncated"
    save(tiny_biased(), builders.tiny_tokenizer(), path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    refused(world, path, str(weights), "truncated", "half-written")


def test_half_written_adapter(world, tmp_path, no_model_work):
    import peft
    adapter = peft.get_peft_model(tiny_biased(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    refused(world, tmp_path / "adapter", str(tmp_path / "adapter"), "half-written adapter")


def test_empty_directory(world, tmp_path, no_model_work):
    (tmp_path / "empty").mkdir()
    refused(world, tmp_path / "empty", str(tmp_path / "empty"), "no config.json")


def test_empty_prompt_file(world, tmp_path, no_model_work):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n")
    refused(world, world["same"], str(empty), "prompt file is empty", prompts=empty)


def test_malformed_prompt_row_names_the_line(world, tmp_path, no_model_work):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"answer": "no prompt"}) + "\n")
    refused(world, world["same"], f"{bad}:2", "'prompt'", prompts=bad)


def test_safetensors_header_check_accepts_a_complete_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3, 4)}, str(tmp_path / "x.safetensors"))
    assert ld.safetensors_shapes(tmp_path / "x.safetensors") == {"w": (3, 4)}


def test_catalog_probe_at_another_layer(world, tmp_path, no_model_work):
    import yaml
    from safetensors.torch import save_file

    from tests.drift.conftest import LATENT, LAYER, OTHER

    save_file({"p.weight": torch.ones(64), "p.bias": torch.tensor(0.0)}, str(tmp_path / "cat.probes.safetensors"))
    (tmp_path / "cat.yaml").write_text(yaml.safe_dump({"sae": "tiny", "layer": LAYER, "features": [
        {"name": "test.pushed", "latent": LATENT}, {"name": "test.other", "latent": OTHER},
        {"name": "test.early", "probe": "p", "layer": LAYER - 1}]}))
    refused(world, world["same"], "test.early", "another layer", catalog=tmp_path / "cat.yaml")
