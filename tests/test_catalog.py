"""Feature catalog: validation with located errors, lookups, lazy probes, save round trip."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file

from monitor.catalog import Catalog, FeatureEntry, load_catalog
from monitor.errors import CatalogError

GOOD = """\
sae: default
layer: 15
features:
  - name: unsafe_code.shell_injection
    latent: 4711
    description: "Shell commands built from user input"
    max_activation: 12.5
    evidence: {auroc: 0.81, examples: ["os.system(f'rm {path}')"]}
  - name: sycophancy.probe
    probe: sycophancy_probe
    description: Agrees against the evidence
    max_activation: 3.0
  - name: sycophancy.other_file
    probe: other
    probes_file: extra/probes.safetensors
"""


def write(tmp_path, text, name="cat.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(tmp_path, text, **kw) -> list[str]:
    with pytest.raises(CatalogError) as err:
        load_catalog(write(tmp_path, text), **kw)
    return str(err.value).splitlines()[1:]


@pytest.fixture
def catalog(tmp_path) -> Catalog:
    save_file({"sycophancy_probe.weight": torch.ones(6),
               "sycophancy_probe.bias": torch.tensor(-1.0)},
              str(tmp_path / "cat.probes.safetensors"))
    (tmp_path / "extra").mkdir()
    save_file({"other.weight": torch.zeros(6), "other.bias": torch.tensor([2.0])},
              str(tmp_path / "extra" / "probes.safetensors"))
    return load_catalog(write(tmp_path, GOOD), sae_id="default", d_sae=8192)


def test_load_and_lookup(catalog):
    assert catalog.sae == "default" and catalog.layer == 15 and len(catalog) == 3
    entry = catalog.get("unsafe_code.shell_injection")
    assert entry.latent == 4711 and entry.kind == "latent" and entry.evidence["auroc"] == 0.81
    assert "sycophancy.probe" in catalog and catalog.name_of_latent(4711) == entry.name
    with pytest.raises(CatalogError, match="did you mean 'unsafe_code.shell_injection'"):
        catalog.get("unsafe_code.shell_injecton")
    with pytest.raises(Exception):
        entry.latent = 3  # type: ignore[misc]


def test_probes_load_lazily_and_are_cached(catalog, tmp_path):
    direction, bias = catalog.probe("sycophancy.probe")
    assert direction.shape == (6,) and direction.dtype == torch.float32 and bias == -1.0
    assert catalog.probe("sycophancy.probe")[0] is direction
    assert catalog.probe("sycophancy.other_file")[1] == 2.0
    catalog.check_probes(6)
    with pytest.raises(CatalogError, match="d_in=7"):
        catalog.check_probes(7)
    with pytest.raises(CatalogError, match="not a probe"):
        catalog.probe("unsafe_code.shell_injection")


def test_probe_file_problems(tmp_path):
    cat = load_catalog(write(tmp_path, GOOD))
    with pytest.raises(CatalogError, match="does not exist"):
        cat.probe("sycophancy.probe")
    save_file({"wrong.weight": torch.ones(2)}, str(tmp_path / "cat.probes.safetensors"))
    with pytest.raises(CatalogError, match="no tensor sycophancy_probe.weight"):
        cat.probe("sycophancy.probe")
    memory = Catalog(sae="x", layer=0, features=(FeatureEntry(name="a.b", probe="k"),))
    with pytest.raises(CatalogError, match="built in memory"):
        memory.probe("a.b")


def test_errors_are_located_and_all_reported(tmp_path):
    text = """\
    sae: default
    layer: 15
    features:
      - name: a.one
        latent: 10
        descripton: typo
      - name: a.one
        latent: 9000
      - name: Bad-Name
        latent: 1
        probe: both
      - name: a.two
        max_activation: -1
    """
    errors = errors_of(tmp_path, text, sae_id="other", d_sae=8192)
    joined = "\n".join(errors)
    assert "cat.yaml:1:6: sae: catalog is for SAE 'default' but the SAE in use is 'other'" in joined
    assert ("cat.yaml:6:5: features[0] (name: a.one).descripton: unknown key 'descripton'; "
            "did you mean 'description'?") in joined
    assert "cat.yaml:7:11: features[1] (name: a.one).name: duplicate feature name 'a.one' " \
           "(first defined at line 4)" in joined
    assert "cat.yaml:8:13: features[1] (name: a.one).latent: latent 9000 is out of range" in joined
    assert "cat.yaml:9:11: features[2] (name: Bad-Name).name: String should match pattern" in joined
    assert "cat.yaml:13:21: features[3] (name: a.two).max_activation: Input should be greater " \
           "than 0" in joined
    assert len(errors) == 6
    assert [int(e.split(":")[1]) for e in errors] == sorted(int(e.split(":")[1]) for e in errors)


@pytest.mark.parametrize("text, expected", [
    ("sae: x\nlayer: 1\nfeatures:\n  - name: a\n    latent: 1\n    probe: p\n",
     "cat.yaml:4:5: features[0] (name: a): feature 'a' needs exactly one of 'latent'"),
    ("sae: x\nlayer: 1\nfeatures:\n  - name: a\n", "needs exactly one of 'latent'"),
    ("sae: x\nlayer: 1\nfeatures:\n  - name: a\n    latent: 1\n    probes_file: f\n",
     "'probes_file' only applies to probe features"),
    ("sae: x\nlayer: [1\n", "cat.yaml:3:1: YAML syntax error"),
    ("- a\n", "must be a mapping"),
    ("sae: x\nlayer: 1\nlayer: 2\n",
     "cat.yaml:3:1: <top level>: key 'layer' appears more than once"),
    ("layer: 1\n", "cat.yaml:1:1: <top level>: missing required key 'sae'"),
])
def test_single_errors(tmp_path, text, expected):
    with pytest.raises(CatalogError) as err:
        load_catalog(write(tmp_path, text))
    assert expected in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(CatalogError, match="cannot read catalog"):
        load_catalog(tmp_path / "nope.yaml")


def test_duplicate_names_rejected_in_code():
    with pytest.raises(ValueError, match="duplicate feature name"):
        Catalog(sae="x", layer=0, features=(FeatureEntry(name="a", latent=1),
                                            FeatureEntry(name="a", latent=2)))


def test_check_sae():
    cat = Catalog(sae="x", layer=0, features=(FeatureEntry(name="a", latent=10),))
    cat.check_sae("x", 11)
    with pytest.raises(CatalogError, match="SAE in use is 'y'"):
        cat.check_sae("y")
    with pytest.raises(CatalogError, match="latent 10 is out of range"):
        cat.check_sae(d_sae=10)


def test_save_round_trip_keeps_probe_files(catalog, tmp_path):
    moved = tmp_path / "sub" / "renamed.yaml"
    catalog.save(moved)
    again = load_catalog(moved)
    assert again.model_dump() != catalog.model_dump()  # probes_file now explicit
    assert [f.name for f in again.features] == list(catalog.names)
    assert again.get("sycophancy.probe").probes_file == "../cat.probes.safetensors"
    assert torch.equal(again.probe("sycophancy.probe")[0], catalog.probe("sycophancy.probe")[0])
    assert again.get("unsafe_code.shell_injection") == catalog.get("unsafe_code.shell_injection")
    in_place = tmp_path / "cat2.yaml"
    catalog.save(in_place)
    assert load_catalog(in_place).probe("sycophancy.other_file")[1] == 2.0
    catalog.save(tmp_path / "cat.yaml")
    assert load_catalog(tmp_path / "cat.yaml") == catalog


def test_hostile_yaml_and_booleans_are_refused_with_their_line(tmp_path):
    from tests.test_yaml_source import ALIAS_BOMB

    with pytest.raises(CatalogError, match=r"cat\.yaml:7:8: aliases \('\*name' references\) "
                                           "would add more than 10,000 values"):
        load_catalog(write(tmp_path, "sae: x\nlayer: 1\n" + ALIAS_BOMB))
    with pytest.raises(CatalogError, match=r"cat\.yaml:3:\d+: nested more than 64 levels"):
        load_catalog(write(tmp_path, "sae: x\nlayer: 1\nfeatures: " + "[" * 500 + "]" * 500))
    with pytest.raises(CatalogError) as err:
        load_catalog(write(tmp_path, "sae: x\nlayer: yes\nfeatures:\n  - {name: a, latent: true}\n"))
    text = str(err.value)
    assert "cat.yaml:2:8: layer: got true, a boolean, where a number belongs" in text
    assert "cat.yaml:4:23: features[0] (name: a).latent: got true, a boolean" in text


def test_a_probe_may_name_its_own_layer_and_a_latent_may_not(tmp_path):
    from monitor.catalog import Catalog, FeatureEntry

    catalog = Catalog(sae="s", layer=15, features=(FeatureEntry(name="a.deep", probe="k", layer=9),
                                                  FeatureEntry(name="a.here", probe="k2")))
    assert (catalog.probe_layer("a.deep"), catalog.probe_layer("a.here")) == (9, 15)
    with pytest.raises(ValueError, match="'layer' only applies to probe features"):
        FeatureEntry(name="a.latent", latent=3, layer=9)
    catalog.save(tmp_path / "c.yaml")  # the layer survives a round trip
    assert load_catalog(tmp_path / "c.yaml").probe_layer("a.deep") == 9
