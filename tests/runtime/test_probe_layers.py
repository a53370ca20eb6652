"""Catalog probes at other layers than the SAE's: the scan hooks each layer a policy reads, each
probe is encoded from its own layer, and the forward stops after the deepest one."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
import yaml
from safetensors.torch import save_file

from monitor.capture import HookPoint, capture, find_blocks
from monitor.catalog import load_catalog
from monitor.errors import MonitorError
from monitor.policy import PolicySet, Rule, compile_policies
from monitor.runtime.hf import Monitor
from monitor.testing import TINY, tied_sae

SAE_LAYER = 6
PROMPT, RESPONSE = "User: list the files\nAssistant: ", "ls -la and then cat the notes file"


@pytest.fixture(scope="module")
def model12():
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**TINY, "num_hidden_layers": 12},
                                                               num_key_value_heads=2))
    return model.eval()


def catalog_with(tmp_path, layers: dict[str, int | None]):
    """Probes ``t.<name>`` with random directions, each at its layer (None: the catalog's)."""
    g = torch.Generator().manual_seed(5)
    tensors, features = {}, []
    for name, layer in layers.items():
        tensors[f"{name}.weight"] = torch.randn(64, generator=g)
        tensors[f"{name}.bias"] = torch.tensor(0.25)
        features.append({"name": f"t.{name}", "probe": name, **({"layer": layer} if layer is not None else {})})
    save_file(tensors, str(tmp_path / "cat.probes.safetensors"))
    (tmp_path / "cat.yaml").write_text(yaml.safe_dump({"sae": "tiny", "layer": SAE_LAYER, "features": features}))
    return load_catalog(tmp_path / "cat.yaml"), tensors


def watching(names, catalog, steer: str | None = None):
    rules = [Rule.model_validate({"id": f"w{i}", "description": "watch", "severity": "info", "mode": "shadow",
                                  "when": {"feature": n, "above": 1e9}, "actions": ["log"]})
             for i, n in enumerate(names)]
    if steer is not None:
        rules.append(Rule.model_validate({
            "id": "s", "description": "steer", "severity": "low", "when": {"feature": steer, "above": 1e9},
            "actions": [{"steer": {"feature": steer, "clamp": 0.0, "along_direction": True}}]}))
    return compile_policies(PolicySet.from_rules(rules), catalog, d_sae=16)


@torch.no_grad()
def reference_peak(model, tok, tensors, name: str, layer: int) -> float:
    """The probe's max over the response tokens at ``layer``, without the monitor."""
    p = tok(PROMPT)["input_ids"]
    r = tok(RESPONSE, add_special_tokens=False)["input_ids"]
    resid = capture(model, torch.tensor([p + r]), HookPoint(layer))[0, len(p):]
    return float((resid @ tensors[f"{name}.weight"] + tensors[f"{name}.bias"]).max())


def test_each_probe_reads_its_own_layer(model12, tiny_tokenizer, tmp_path):
    catalog, tensors = catalog_with(tmp_path, {"l9": 9, "l2": 2, "own": None})
    mon = Monitor(model12, tiny_tokenizer, sae=tied_sae(SAE_LAYER), policies=watching(
        ["t.l9", "t.l2", "t.own"], catalog), catalog=catalog, self_test=False)
    report = mon.scan(RESPONSE, prompt=PROMPT)
    for name, layer in (("l9", 9), ("l2", 2), ("own", SAE_LAYER)):
        assert report.peak(f"t.{name}") == pytest.approx(max(0.0, reference_peak(
            model12, tiny_tokenizer, tensors, name, layer)), rel=1e-4, abs=1e-4)
    # The same direction read at the SAE's layer gives another value: the layer is what was read.
    assert abs(reference_peak(model12, tiny_tokenizer, tensors, "l9", 9)
               - reference_peak(model12, tiny_tokenizer, tensors, "l9", SAE_LAYER)) > 1e-2
    batched = mon.scan_many([(RESPONSE)] * 3, batch_size=3)
    alone = mon.scan(RESPONSE)
    for rep in batched:
        torch.testing.assert_close(rep.peaks["response"], alone.peaks["response"], rtol=1e-4, atol=1e-4)
    mon.close()


@pytest.mark.parametrize("layers, deepest", [({"l9": 9}, 9), ({"l2": 2}, SAE_LAYER), ({}, SAE_LAYER)])
def test_the_forward_stops_after_the_deepest_layer_read(model12, tiny_tokenizer, tmp_path, layers, deepest):
    catalog, _ = catalog_with(tmp_path, {**layers, "own": None})
    mon = Monitor(model12, tiny_tokenizer, sae=tied_sae(SAE_LAYER), policies=watching(
        [f"t.{n}" for n in (*layers, "own")], catalog), catalog=catalog, self_test=False)
    ran: list[int] = []
    handles = [block.register_forward_pre_hook(lambda *_, i=i: ran.append(i))  # blocks that started
               for i, block in enumerate(find_blocks(model12))]
    try:
        mon.scan(RESPONSE, prompt=PROMPT)
    finally:
        for h in handles:
            h.remove()
    assert ran == list(range(deepest + 1))
    assert mon.encoder_for(mon.policy).extra_layers == tuple(v for v in layers.values() if v != SAE_LAYER)
    mon.close()


def test_generation_reads_earlier_layers_and_refuses_later_ones(model12, tiny_tokenizer, tmp_path):
    catalog, tensors = catalog_with(tmp_path, {"l2": 2, "l9": 9, "own": None})
    prompt = torch.tensor([tiny_tokenizer(PROMPT)["input_ids"]])
    mon = Monitor(model12, tiny_tokenizer, sae=tied_sae(SAE_LAYER), policies=watching(["t.l2", "t.own"], catalog),
                  catalog=catalog, self_test=False)
    mon.generate(prompt, max_new_tokens=3, do_sample=False)
    report = mon.last_report
    with torch.no_grad():  # the prompt's monitored tokens (position 0 is not), read at layer 2
        resid = capture(model12, prompt, HookPoint(2))[0, 1:]
    expected = float((resid @ tensors["l2.weight"] + tensors["l2.bias"]).max())
    assert report.peak("t.l2", scope="prompt") == pytest.approx(max(0.0, expected), rel=1e-4, abs=1e-4)
    assert report.tokens_monitored["response"] > 0 and report.error is None
    mon.close()
    later = Monitor(model12, tiny_tokenizer, sae=tied_sae(SAE_LAYER), policies=watching(["t.l9"], catalog),
                    catalog=catalog, self_test=False, on_error="open")
    with pytest.raises(MonitorError, match=r"layer\(s\) \[9\], after the SAE's layer 6.*scan"):
        later.generate(prompt, max_new_tokens=2)
    later.close()


def test_steering_a_probe_read_at_another_layer_is_refused_with_the_fix(model12, tiny_tokenizer, tmp_path):
    catalog, _ = catalog_with(tmp_path, {"l9": 9, "own": None})
    with pytest.raises(MonitorError, match="steers probe 't.l9', which reads layer 9"):
        Monitor(model12, tiny_tokenizer, sae=tied_sae(SAE_LAYER), policies=watching([], catalog, steer="t.l9"),
                catalog=catalog, self_test=False).scan(RESPONSE)
