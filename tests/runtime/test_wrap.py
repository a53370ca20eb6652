"""Building a monitor: the catalog is found beside the SAE however the SAE was named."""

from __future__ import annotations

import pytest

from monitor.catalog import Catalog
from monitor.runtime.wrap import resolve_catalog
from monitor.sae import load_sae
from monitor.shipped import SHIPPED_CATALOG, catalog_beside
from monitor.testing import tied_sae

CATALOG = """\
sae: tied
layer: 2
features:
  - name: test.first
    latent: 0
    max_activation: 2.0
"""


def test_catalog_beside_a_saved_sae_is_found_from_the_object(tmp_path):
    tied_sae().save(tmp_path / "sae")
    (tmp_path / "sae" / "catalog.yaml").write_text(CATALOG)
    sae = load_sae(tmp_path / "sae")
    assert sae.source_path == tmp_path / "sae"
    catalog = resolve_catalog(sae, sae, None)
    assert isinstance(catalog, Catalog) and catalog.get("test.first").latent == 0
    assert resolve_catalog(sae, str(tmp_path / "sae"), None) is not None  # named by path
    (tmp_path / "sae" / "catalog.yaml").unlink()
    assert resolve_catalog(sae, sae, None) is None  # nothing beside it: no catalog, no guess


def test_the_shipped_sae_names_its_catalog_by_name_and_by_object():
    assert catalog_beside("default") == SHIPPED_CATALOG
    sae = load_sae("default")
    assert resolve_catalog(sae, sae, None) is not None


@pytest.mark.e2e
def test_wrap_with_a_loaded_default_sae_compiles_the_shipped_policies(default_model):
    """Issue 13.7: ``wrap(model, tok, sae=load_sae("default"))`` used to fail with a
    PolicyError for the shipped policies unless ``catalog=`` was given."""
    import monitor

    model, tokenizer = default_model
    mon = monitor.wrap(model, tokenizer, sae=monitor.load_sae("default"))
    assert mon.catalog is not None and mon.policy.rules
    mon.close()
