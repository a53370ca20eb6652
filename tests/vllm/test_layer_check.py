"""The vLLM engine reads the SAE's layer only: a policy with a probe at another layer is refused
with the fix, at start-up and on reload (the last good policy stays active). No vLLM needed."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

from monitor.catalog import load_catalog
from monitor.errors import PolicyError
from monitor.policy import PolicyStore
from monitor.runtime.vllm.setup import sae_layer_only
from monitor.testing import tied_sae

SAE_LAYER = 2


def policy_text(feature: str) -> str:
    return (f"version: '1'\nrules:\n  - id: watch\n    description: watch a probe\n    severity: info\n"
            f"    mode: shadow\n    when: {{feature: {feature}, above: 1.0e9}}\n    actions: [log]\n")


@pytest.fixture
def setup(tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file({"here.weight": torch.randn(64, generator=g), "here.bias": torch.tensor(0.0),
               "early.weight": torch.randn(64, generator=g), "early.bias": torch.tensor(0.0)},
              str(tmp_path / "cat.probes.safetensors"))
    (tmp_path / "cat.yaml").write_text(yaml.safe_dump({"sae": "tiny", "layer": SAE_LAYER, "features": [
        {"name": "t.here", "probe": "here"}, {"name": "t.early", "probe": "early", "layer": 1}]}))
    sae = tied_sae(SAE_LAYER)
    catalog = load_catalog(tmp_path / "cat.yaml")
    policy = tmp_path / "policy.yaml"
    return sae, catalog, policy


def test_a_probe_at_another_layer_is_refused_at_start_with_the_fix(setup):
    sae, catalog, policy = setup
    policy.write_text(policy_text("t.early"))
    with pytest.raises(PolicyError, match=r"layer\(s\) \[1\].*--engine transformers"):
        PolicyStore([str(policy)], catalog, sae.cfg.d_sae, accept=sae_layer_only(sae, catalog))


def test_a_reload_to_another_layer_keeps_the_last_good_policy(setup):
    sae, catalog, policy = setup
    policy.write_text(policy_text("t.here"))
    store = PolicyStore([str(policy)], catalog, sae.cfg.d_sae, accept=sae_layer_only(sae, catalog))
    good = store.version_id
    policy.write_text(policy_text("t.early"))
    result = store.reload()
    assert not result.ok and "vLLM engine reads only the SAE's layer" in (result.error or "")
    assert store.version_id == good
