"""Catalog entries from a discovery: named latents with their evidence, merged into a catalog.

The last stage of discovery (:mod:`monitor.discover`): :func:`to_catalog_entries` turns ranked
latents into :class:`monitor.catalog.FeatureEntry` records carrying the evidence a reviewer
needs (SAE id, AUROC, firing rates, pair win rate, examples, data sizes), and
:func:`merge_into_catalog` adds them to an existing catalog of the same SAE.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from monitor.activations import LabeledText
from monitor.errors import CatalogError

if TYPE_CHECKING:
    from monitor.discover import DiscoveryResult


def _slug(text: str, default: str = "discovered") -> str:
    slug = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")
    if not slug or not slug[0].isalpha():
        slug = f"{default}_{slug}".strip("_") if slug else default
    return slug


def _snippet(item: LabeledText, chars: int = 160) -> str:
    """The in-scope part of ``item`` (first span), shortened to about ``chars`` characters."""
    start, end = item.spans[0] if item.spans else (0, len(item.text))
    piece = " ".join(item.text[start:end].split())
    return piece if len(piece) <= chars else piece[:chars - 1] + "…"


def to_catalog_entries(result: DiscoveryResult, names: Mapping[int, str] | int, sae_id: str,
                       max_activations: Mapping[int, float] | None = None, *,
                       examples: Mapping[int, Sequence[str]] | None = None,
                       descriptions: Mapping[int, str] | None = None,
                       n_examples: int = 3) -> list[Any]:
    """Catalog entries (:class:`monitor.catalog.FeatureEntry`) for discovered latents.

    ``names``: ``{latent: "dotted.name"}``, or an int N to take the N best ranked latents
    named ``<category>.latent_<index>`` (rename them after reading their examples).
    ``max_activations``: from :func:`max_activations` over a reference corpus; a latent that
    never fired gets none. ``examples``: contexts per latent (e.g. from
    :func:`monitor.explain.example_contexts`); by default the in-scope text of the positive
    items where the latent is highest. Evidence records the SAE id, AUROC, firing rates,
    mean gap, pair win rate and the data sizes.
    """
    from monitor.catalog import FeatureEntry

    if isinstance(names, int):
        positives = Counter(item.category for item in result.items if item.label == 1)
        prefix = _slug(positives.most_common(1)[0][0] if positives else "")
        names = {j: f"{prefix}.latent_{j}" for j in result.ranked[:names].tolist()}
    d_sae = result.pooled.shape[1]
    bad = [j for j in names if not 0 <= int(j) < d_sae]
    if bad:
        raise CatalogError(f"latents {bad} are out of range for an SAE with {d_sae} latents "
                           f"(valid: 0..{d_sae - 1})")
    rows = {row["latent"]: row for row in result.rows(list(names))}
    entries = []
    for latent, name in names.items():
        row = rows[int(latent)]
        evidence: dict[str, Any] = {"sae": sae_id, "hook": result.point.name, "auroc": row["auroc"]}
        if "pair_win" in row:
            evidence["pair_win_rate"] = row["pair_win"]
            evidence["n_pairs"] = result.scores.n_pairs
        evidence.update({"firing_rate_pos": row["fire_pos"], "firing_rate_neg": row["fire_neg"],
                         "mean_gap": row["gap"], "n_pos": result.scores.n_pos,
                         "n_neg": result.scores.n_neg})
        if examples is not None and examples.get(int(latent)):
            evidence["examples"] = list(examples[int(latent)])[:n_examples]
        else:
            evidence["examples"] = [_snippet(result.items[i])
                                    for i in result.top_items(int(latent), n_examples)]
        peak = (max_activations or {}).get(int(latent))
        try:
            entries.append(FeatureEntry(
                name=name, latent=int(latent),
                description=(descriptions or {}).get(int(latent), ""),
                max_activation=round(float(peak), 4) if peak is not None and peak > 0 else None,
                evidence=evidence))
        except ValueError as exc:  # pydantic's ValidationError: a bad name
            raise CatalogError(f"cannot make a catalog entry for latent {latent} named {name!r}: "
                               f"{exc}") from None
    return entries


def merge_into_catalog(entries: Sequence[Any], sae_id: str, layer: int, existing: Any = None) -> Any:
    """A :class:`monitor.catalog.Catalog` with ``existing``'s features plus ``entries``; an entry
    replaces an existing feature of the same name, in place. Refuses a catalog for another SAE."""
    from monitor.catalog import Catalog

    if existing is None:
        return Catalog(sae=sae_id, layer=layer, features=tuple(entries))
    if existing.sae != sae_id or existing.layer != layer:
        raise CatalogError(f"catalog {existing.source or ''} is for SAE '{existing.sae}' at layer "
                           f"{existing.layer}, not '{sae_id}' at layer {layer}; write a new one")
    new = {e.name: e for e in entries}
    features = [new.pop(f.name, f) for f in existing.features] + list(new.values())
    merged = Catalog(sae=sae_id, layer=layer, features=tuple(features))
    return merged.with_source(existing.source) if existing.source is not None else merged
