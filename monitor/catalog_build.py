"""Write what ``discover`` found into a feature catalog: named latents with their evidence,
measured peaks and example contexts, and optionally a linear probe.

The step after :func:`monitor.discover.discover` in the research flow (discover -> name ->
catalog -> policy); it measures and fits, then writes the records of
:mod:`monitor.catalog_entries`. The catalog is what policies reference by name, so each entry
carries the ``max_activation`` that ``above_relative`` thresholds scale by, measured over a
reference corpus, and the evidence a reviewer reads before trusting the name. The entries are
merged into ``out`` when it exists (an entry replaces a feature of the same name) and the file
is written; a probe's weights go to ``<out stem>.probes.safetensors`` beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor.errors import CatalogError

if TYPE_CHECKING:
    from torch import nn

    from monitor.activations import LabeledText
    from monitor.discover import DiscoveryResult

#: ``progress(stage, done, total)``: stages are ``"max activation"`` and ``"probe"``.
StageProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CatalogWrite:
    """What :func:`write_discovered` wrote: the catalog path, the feature names written (in
    order) and, with a probe, ``{"name": ..., **evidence}`` (held-out ``auroc_heldout``,
    ``n_heldout``, ...) and the safetensors file holding its weights."""

    path: Path
    written: tuple[str, ...]
    probe: Mapping[str, Any] | None = None
    probes_file: Path | None = None


def probe_key(name: str) -> str:
    """The safetensors key of probe feature ``name`` (dots are not allowed in keys)."""
    return name.replace(".", "_")


def write_discovered(model: nn.Module, tokenizer: Any, sae: Any, result: DiscoveryResult,
                     items: Sequence[LabeledText], out: str | Path, *, sae_id: str,
                     names: Mapping[int, str] | None = None, catalog_top: int = 0,
                     probe: str | None = None, probe_l2: float = 1e-3,
                     corpus: Sequence[str] | None = None, ctx: int = 256, batch_size: int = 8,
                     seed: int = 0, progress: StageProgress | None = None) -> CatalogWrite:
    """Add discovered features to the catalog at ``out`` (created if missing) and write it.

    ``names``: ``{latent: "dotted.name"}``; ``catalog_top``: also the N best ranked latents
    under provisional names (``<category>.latent_<index>``; explicit ``names`` win for the same
    latent); ``probe``: also fit a linear probe on ``items`` at the SAE's hook point and add it
    as feature ``probe``. ``corpus`` (default: the texts of ``items``) is where each feature's
    ``max_activation`` is measured. Raises :class:`CatalogError` when there is nothing to write
    or ``out`` is a catalog for another SAE or layer.
    """
    from monitor.catalog import load_catalog
    from monitor.catalog_entries import merge_into_catalog, to_catalog_entries
    from monitor.discover import max_activations
    from monitor.explain import example_contexts

    names = dict(names or {})
    if not (names or catalog_top or probe):
        raise CatalogError("nothing to write to the catalog: give names, catalog_top or probe")
    out = Path(out)
    existing = load_catalog(out, sae_id=sae_id, d_sae=sae.cfg.d_sae) if out.exists() else None
    if catalog_top:
        auto = to_catalog_entries(result, catalog_top, sae_id)
        names = {**{e.latent: e.name for e in auto}, **names}
    texts = list(corpus) if corpus is not None else [i.text for i in items]
    stage = (lambda name: partial(progress, name)) if progress is not None else (lambda name: None)
    peaks = max_activations(model, tokenizer, sae, texts, list(names), ctx=ctx,
                                 batch_size=batch_size, progress=stage("max activation"))
    examples = example_contexts(model, tokenizer, sae, result, list(names), ctx=ctx)
    entries = (to_catalog_entries(result, names, sae_id, peaks, examples=examples)
               if names else [])
    probe_info: dict[str, Any] | None = None
    probes_file: Path | None = None
    if probe:
        from monitor.probes import fit_probe, probe_entry, probe_scores, save_probe

        fitted = fit_probe(model, tokenizer, items, result.point, l2=probe_l2, ctx=ctx,
                           batch_size=batch_size, seed=seed, progress=stage("probe"))
        key = probe_key(probe)
        probes_file = save_probe(out.parent / f"{out.stem}.probes.safetensors", key,
                                 fitted.weight, fitted.bias)
        peak = float(probe_scores(model, tokenizer, texts, result.point, fitted.weight,
                                  fitted.bias, ctx=ctx, batch_size=batch_size).max())
        entries.append(probe_entry(probe, key, fitted, max_activation=peak))
        probe_info = {"name": probe, **fitted.evidence}
    catalog = merge_into_catalog(entries, sae_id, result.point.layer, existing)
    catalog.save(out)
    return CatalogWrite(path=out, written=tuple(e.name for e in entries), probe=probe_info,
                        probes_file=probes_file)
