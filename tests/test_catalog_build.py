"""write_discovered: discovered latents (and a probe) into a catalog on disk, merged, measured."""

from __future__ import annotations

import pytest

from monitor.catalog import load_catalog
from monitor.catalog_build import probe_key, write_discovered
from monitor.discover import discover, labeled_item
from monitor.errors import CatalogError
from tests.test_discover import VALUE, dialogue_rows, setup  # noqa: F401  (setup is a fixture)


@pytest.fixture(scope="module")
def found(setup):  # noqa: F811
    model, tokenizer, sae = setup
    items = [labeled_item(r) for r in dialogue_rows()]
    return model, tokenizer, sae, items, discover(model, tokenizer, sae, items, top=4)


def test_names_are_written_with_peaks_and_examples_then_merged(found, tmp_path):
    model, tokenizer, sae, items, result = found
    out = tmp_path / "cat.yaml"
    stages: list[str] = []
    written = write_discovered(model, tokenizer, sae, result, items, out, sae_id="tiny",
                               names={3: "demo.letter_z"}, catalog_top=1,
                               progress=lambda stage, done, total: stages.append(stage))
    # --catalog-top 1 picks latent 3 (ranked first); the explicit name wins for it
    assert int(result.ranked[0]) == 3
    assert written.path == out and written.written == ("demo.letter_z",)
    assert written.probe is None and written.probes_file is None
    assert set(stages) == {"max activation"}
    z = load_catalog(out, sae_id="tiny", d_sae=sae.cfg.d_sae).get("demo.letter_z")
    assert z.latent == 3 and z.max_activation == pytest.approx(VALUE, abs=1e-3)
    assert z.evidence["auroc"] == 1.0 and any("Z" in e for e in z.evidence["examples"])

    again = write_discovered(model, tokenizer, sae, result, items, out, sae_id="tiny",
                             names={7: "demo.letter_k"}, corpus=["no such letter here"])
    assert again.written == ("demo.letter_k",)
    merged = load_catalog(out, sae_id="tiny", d_sae=sae.cfg.d_sae)
    assert merged.names == ("demo.letter_z", "demo.letter_k")
    # measured over the corpus given, where 'K' never occurs (the items' texts hold it)
    assert merged.get("demo.letter_k").max_activation is None
    measured = write_discovered(model, tokenizer, sae, result, items, out, sae_id="tiny",
                                names={7: "demo.letter_k"})
    assert measured.written == ("demo.letter_k",)
    assert load_catalog(out).get("demo.letter_k").max_activation == pytest.approx(VALUE, abs=1e-3)


def test_a_probe_is_fitted_saved_beside_the_catalog_and_listed(found, tmp_path):
    model, tokenizer, sae, items, result = found
    out = tmp_path / "cat.yaml"
    written = write_discovered(model, tokenizer, sae, result, items, out, sae_id="tiny",
                               probe="demo.z_probe", seed=1)
    assert written.written == ("demo.z_probe",)
    assert written.probes_file == tmp_path / "cat.probes.safetensors" and written.probes_file.is_file()
    assert written.probe is not None and written.probe["name"] == "demo.z_probe"
    assert "auroc_heldout" in written.probe and written.probe["n_heldout"] > 0
    catalog = load_catalog(out, sae_id="tiny", d_sae=sae.cfg.d_sae)
    entry = catalog.get("demo.z_probe")
    assert entry.latent is None and entry.probe == probe_key("demo.z_probe") == "demo_z_probe"
    weight, _ = catalog.probe("demo.z_probe")
    assert tuple(weight.shape) == (sae.cfg.d_in,)


def test_refuses_nothing_to_write_and_a_catalog_of_another_sae(found, tmp_path):
    model, tokenizer, sae, items, result = found
    with pytest.raises(CatalogError, match="nothing to write"):
        write_discovered(model, tokenizer, sae, result, items, tmp_path / "c.yaml", sae_id="tiny")
    write_discovered(model, tokenizer, sae, result, items, tmp_path / "c.yaml", sae_id="tiny",
                     names={3: "demo.letter_z"})
    with pytest.raises(CatalogError, match="tiny"):
        write_discovered(model, tokenizer, sae, result, items, tmp_path / "c.yaml",
                         sae_id="other", names={5: "demo.letter_q"})
