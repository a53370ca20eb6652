"""Small builders for policy tests: catalogs, policy files and compiled policies from YAML text."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
import yaml

from monitor.catalog import Catalog, load_catalog
from monitor.policy import CompiledPolicy, PolicySet, Rule, compile_policies

D_SAE = 64

CATALOG_YAML = """\
sae: test-sae
layer: 3
features:
  - name: unsafe_code.shell_injection
    latent: 7
    description: shell commands from user input
    max_activation: 10.0
  - name: deception.lying
    latent: 12
    max_activation: 4.0
  - name: toxicity.insult
    latent: 3
  - name: sycophancy.probe
    probe: syco
    max_activation: 2.0
"""


def write(directory: Path, name: str, text: str) -> Path:
    """Write dedented ``text`` to ``directory/name`` and return the path."""
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def make_catalog(directory: Path, d_in: int = 8) -> Catalog:
    """The test catalog above, with a probes file holding probe 'syco' of width ``d_in``."""
    from safetensors.torch import save_file

    path = write(directory, "cat.yaml", CATALOG_YAML)
    save_file({"syco.weight": torch.arange(d_in, dtype=torch.float32),
               "syco.bias": torch.tensor(0.5)}, str(directory / "cat.probes.safetensors"))
    return load_catalog(path)


def rules_from_yaml(text: str) -> list[Rule]:
    """Rules parsed from a YAML list (no file, no positions)."""
    return [Rule.model_validate(r) for r in yaml.safe_load(textwrap.dedent(text))]


def compiled(text: str, catalog: Catalog | None = None, d_sae: int = D_SAE) -> CompiledPolicy:
    """Compile a YAML list of rules."""
    return compile_policies(PolicySet.from_rules(rules_from_yaml(text)), catalog, d_sae=d_sae)


def columns(policy: CompiledPolicy, acts: torch.Tensor) -> torch.Tensor:
    """Select ``policy.features`` columns from full latent activations ``acts[..., d_sae]``."""
    assert all(f.kind == "latent" for f in policy.features)
    return acts.index_select(-1, policy.latent_indices)


def ones(batch: int, tokens: int) -> torch.Tensor:
    """An all-True mask ``[batch, tokens]``."""
    return torch.ones(batch, tokens, dtype=torch.bool)
