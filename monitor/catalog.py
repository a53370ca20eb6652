"""The feature catalog: human names for SAE latents and linear probes.

Policies say ``feature: unsafe_code.shell_injection`` rather than ``latent: 4711`` because latent
indices change whenever an SAE is retrained; the catalog is the one place that binds names to
indices for one SAE. A catalog file looks like::

    sae: default                 # id of the SAE this catalog describes
    layer: 15                    # the layer that SAE reads
    features:
      - name: unsafe_code.shell_injection   # dotted lowercase, unique
        latent: 4711                         # SAE latent index (exactly one of latent / probe)
        description: "Shell commands built from user input"
        max_activation: 12.5                 # max seen over a corpus; scales relative thresholds
        evidence: {auroc: 0.81, examples: ["os.system(f'rm {path}')"]}
      - name: sycophancy.probe
        probe: sycophancy_probe              # tensors <probe>.weight [d_in] and <probe>.bias []
        probes_file: probes.safetensors      # default: "<catalog stem>.probes.safetensors"
        description: "Agrees with the user against the evidence"
        max_activation: 3.0
      - name: backdoor.probe_l9
        probe: backdoor_l9
        layer: 9                             # a probe may read another layer (resid_post of block 9)

The file is strict (unknown keys are errors) and checked when it is loaded against the SAE it
will be used with (``sae_id``, ``d_sae``), so a wrong index fails at startup, not at the first
token. Probe vectors are read lazily from safetensors the first time :meth:`Catalog.probe` asks;
torch is imported only then, so validating policies against a catalog (``policy check`` in a
pre-commit hook) never pays for it. The file is read with the one YAML loader
(:func:`monitor.yaml_source.load_document`: size limit, alias and nesting limits, located errors).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import (ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from monitor.errors import CatalogError
from monitor.yaml_messages import (duplicate_key_messages, located, sort_messages, suggest,
                                   validation_messages)
from monitor.yaml_source import (DocumentKind, NumbersNotBooleans, YamlDocumentError, YamlSource,
                                 load_document)

if TYPE_CHECKING:
    import torch

FEATURE_NAME_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$"
CATALOG_FILE = DocumentKind(what="catalog", needs="'sae', 'layer' and 'features'",
                            keys="'sae', 'layer' and 'features'", max_bytes=64 * 1024 * 1024)
"""Catalogs may name every latent of a wide SAE with evidence, hence the generous size limit."""
_LOADER_CHECKS = "catalog_loader_checks"  # validation context flag: the loader reports these


class FeatureEntry(NumbersNotBooleans):
    """One named feature: either an SAE latent or a linear probe on the residual stream."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=FEATURE_NAME_PATTERN, description=(
        "Dotted lowercase name used by policies, e.g. 'unsafe_code.shell_injection'. "
        "Unique within the catalog."))
    latent: int | None = Field(default=None, ge=0, description=(
        "Index of the SAE latent this feature reads. Exactly one of 'latent' and 'probe'."))
    probe: str | None = Field(default=None, min_length=1, description=(
        "Key of a linear probe in the probes file: tensors '<key>.weight' of shape [d_in] and "
        "'<key>.bias' (a scalar). Exactly one of 'latent' and 'probe'."))
    probes_file: str | None = Field(default=None, min_length=1, description=(
        "Safetensors file holding the probe, relative to the catalog file. "
        "Default: '<catalog stem>.probes.safetensors'. Only for probe features."))
    layer: int | None = Field(default=None, ge=0, description=(
        "Layer of the residual stream this probe reads (resid_post of that block), when it is not "
        "the catalog's layer. Only for probe features; the runtime hooks every layer a policy "
        "needs."))
    description: str = Field(default="", description="What the feature detects, for people.")
    max_activation: float | None = Field(default=None, gt=0, allow_inf_nan=False, description=(
        "Largest activation observed over a reference corpus. Policies use it for relative "
        "thresholds (above_relative) and relative steering (clamp_relative)."))
    evidence: dict[str, Any] = Field(default_factory=dict, description=(
        "Free-form record of why this name is trusted (AUROC, example texts, ...)."))

    @model_validator(mode="after")
    def _one_source(self) -> FeatureEntry:
        if (self.latent is None) == (self.probe is None):
            raise ValueError(f"feature '{self.name}' needs exactly one of 'latent' (an SAE latent "
                             "index) or 'probe' (a probe key)")
        if self.probes_file is not None and self.probe is None:
            raise ValueError(f"feature '{self.name}': 'probes_file' only applies to probe "
                             "features; remove it or use 'probe:'")
        if self.layer is not None and self.probe is None:
            raise ValueError(f"feature '{self.name}': 'layer' only applies to probe features (an "
                             "SAE latent is read at the SAE's layer); remove it")
        return self

    @property
    def kind(self) -> str:
        """``"latent"`` or ``"probe"``."""
        return "latent" if self.latent is not None else "probe"


class Catalog(NumbersNotBooleans):
    """A validated catalog. Immutable; probe tensors are cached on first use (thread-safe)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sae: str = Field(min_length=1, description="Id of the SAE whose latents this catalog names.")
    layer: int = Field(ge=0, description="Layer of the residual stream that SAE (and probes) read.")
    features: tuple[FeatureEntry, ...] = Field(default=(), description="The named features.")

    _source: Path | None = PrivateAttr(default=None)
    _by_name: dict[str, FeatureEntry] = PrivateAttr(default_factory=dict)
    _probe_cache: dict[str, tuple[torch.Tensor, float]] = PrivateAttr(default_factory=dict)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @field_validator("features")
    @classmethod
    def _unique(cls, features: tuple[FeatureEntry, ...],
                info: ValidationInfo) -> tuple[FeatureEntry, ...]:
        if info.context and info.context.get(_LOADER_CHECKS):
            return features  # load_catalog reports duplicates with their line numbers
        seen: set[str] = set()
        for f in features:
            if f.name in seen:
                raise ValueError(f"duplicate feature name '{f.name}'")
            seen.add(f.name)
        return features

    def model_post_init(self, context: Any, /) -> None:
        self._by_name = {f.name: f for f in self.features}

    def __eq__(self, other: object) -> bool:
        """Equal when the content is; where it was loaded from and the probe cache don't count."""
        if not isinstance(other, Catalog):
            return NotImplemented
        return (self.sae, self.layer, self.features) == (other.sae, other.layer, other.features)

    __hash__ = None  # type: ignore[assignment]  # evidence is a dict: not hashable

    # ---------------------------------------------------------------- lookup

    @property
    def names(self) -> tuple[str, ...]:
        """Every feature name, in file order."""
        return tuple(f.name for f in self.features)

    @property
    def source(self) -> Path | None:
        """The file this catalog was loaded from or saved to (None if built in memory)."""
        return self._source

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.features)

    def find(self, name: str) -> FeatureEntry | None:
        """The entry called ``name``, or None."""
        return self._by_name.get(name)

    def suggest(self, name: str, n: int = 3) -> list[str]:
        """Names close to ``name`` (for did-you-mean messages)."""
        return suggest(name, self.names, n=n)

    def probe_layer(self, name: str) -> int:
        """The layer probe feature ``name`` reads: its own ``layer``, else the catalog's."""
        entry = self.get(name)
        return entry.layer if entry.layer is not None else self.layer

    def get(self, name: str) -> FeatureEntry:
        """The entry called ``name``. Raises :class:`CatalogError` with suggestions if unknown."""
        entry = self._by_name.get(name)
        if entry is None:
            close = self.suggest(name)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise CatalogError(f"unknown feature '{name}' in catalog for SAE '{self.sae}'{hint}")
        return entry

    def name_of_latent(self, index: int) -> str | None:
        """The first feature name bound to SAE latent ``index``, if any."""
        for f in self.features:
            if f.latent == index:
                return f.name
        return None

    def check_sae(self, sae_id: str | None = None, d_sae: int | None = None) -> None:
        """Raise :class:`CatalogError` unless this catalog fits SAE ``sae_id`` with ``d_sae`` latents."""
        problems = []
        if sae_id is not None and self.sae != sae_id:
            problems.append(f"catalog is for SAE '{self.sae}' but the SAE in use is '{sae_id}'")
        if d_sae is not None:
            problems += [f"feature '{f.name}': latent {f.latent} is out of range for an SAE with "
                         f"{d_sae} latents (valid: 0..{d_sae - 1})"
                         for f in self.features if f.latent is not None and f.latent >= d_sae]
        if problems:
            raise CatalogError("catalog does not fit the SAE:\n  " + "\n  ".join(problems))

    # ---------------------------------------------------------------- probes

    def probe_path(self, name: str) -> Path:
        """The safetensors file holding probe feature ``name``."""
        entry = self.get(name)
        if entry.probe is None:
            raise CatalogError(f"feature '{name}' is SAE latent {entry.latent}, not a probe")
        if entry.probes_file is not None and Path(entry.probes_file).is_absolute():
            return Path(entry.probes_file)
        if self._source is None:
            raise CatalogError(f"probe feature '{name}': this catalog was built in memory, so "
                               "there is no directory to find its probes file in; save it first "
                               "or give an absolute 'probes_file'")
        file = entry.probes_file or f"{self._source.stem}.probes.safetensors"
        return self._source.parent / file

    def probe(self, name: str) -> tuple[torch.Tensor, float]:
        """``(direction [d_in] float32, bias)`` of probe feature ``name``, loaded on first use.

        The probe's score for a residual vector ``x`` is ``x @ direction + bias``.
        """
        with self._lock:
            cached = self._probe_cache.get(name)
            if cached is not None:
                return cached
            entry = self.get(name)
            path = self.probe_path(name)
            key = entry.probe
            if not path.is_file():
                raise CatalogError(f"probe feature '{name}': probes file {path} does not exist")
            import torch
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as fh:
                    keys = set(fh.keys())
                    missing = [k for k in (f"{key}.weight", f"{key}.bias") if k not in keys]
                    if missing:
                        have = ", ".join(sorted(keys))
                        raise CatalogError(f"probe feature '{name}': {path} has no tensor "
                                           f"{', '.join(missing)} (it has: {have})")
                    weight = fh.get_tensor(f"{key}.weight")
                    bias = fh.get_tensor(f"{key}.bias")
            except CatalogError:
                raise
            except Exception as exc:  # safetensors raises its own error types
                raise CatalogError(f"probe feature '{name}': cannot read {path}: {exc}") from exc
            if weight.dim() != 1 or bias.numel() != 1:
                raise CatalogError(f"probe feature '{name}': expected '{key}.weight' of shape "
                                   f"[d_in] and a scalar '{key}.bias', got {tuple(weight.shape)} "
                                   f"and {tuple(bias.shape)} in {path}")
            result = (weight.to(torch.float32).contiguous(), float(bias.reshape(()).item()))
            self._probe_cache[name] = result
            return result

    def check_probes(self, d_in: int) -> None:
        """Load every probe now and check it has ``d_in`` entries (call when binding to a model)."""
        for f in self.features:
            if f.probe is not None:
                direction, _ = self.probe(f.name)
                if direction.numel() != d_in:
                    raise CatalogError(f"probe feature '{f.name}' has {direction.numel()} entries "
                                       f"but the model's residual stream has d_in={d_in}")

    # ---------------------------------------------------------------- persistence

    def with_source(self, path: str | Path) -> Catalog:
        """A copy that resolves probe files relative to ``path``."""
        copy = self.model_copy()
        copy._source = Path(path)
        copy._by_name = dict(self._by_name)
        copy._probe_cache = {}
        copy._lock = threading.Lock()
        return copy

    def save(self, path: str | Path) -> None:
        """Write this catalog as YAML to ``path``.

        Probe features keep pointing at the same safetensors file: when the new location would
        change where the default ``<stem>.probes.safetensors`` resolves, an explicit relative
        ``probes_file`` is written. The probes file itself is not copied.
        """
        path = Path(path)
        features = []
        for f in self.features:
            row = f.model_dump(exclude_none=True, exclude_defaults=True)
            row["name"] = f.name
            if f.probe is not None and self._source is not None:
                target = self.probe_path(f.name).resolve()
                default = (path.parent / f"{path.stem}.probes.safetensors").resolve()
                if target != default:
                    row["probes_file"] = os.path.relpath(target, path.parent.resolve())
                else:
                    row.pop("probes_file", None)
            order = ["name", "latent", "probe", "probes_file", "layer", "description",
                     "max_activation", "evidence"]
            features.append({k: row[k] for k in order if k in row})
        doc = {"sae": self.sae, "layer": self.layer, "features": features}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")


def load_catalog(path: str | Path, *, sae_id: str | None = None,
                 d_sae: int | None = None) -> Catalog:
    """Load and validate the catalog at ``path``; optionally check it against the SAE in use.

    Raises :class:`CatalogError` listing every problem, each as ``file:line:column: entry:
    problem``: YAML syntax, unknown or missing keys, wrong types, duplicate names, an ``sae``
    different from ``sae_id``, and latents ``>= d_sae``.
    """
    path = Path(path)
    try:
        src = load_document(path, CATALOG_FILE)
    except YamlDocumentError as exc:
        raise CatalogError(exc.message) from None
    errors = duplicate_key_messages(src)
    catalog: Catalog | None = None
    try:
        catalog = Catalog.model_validate(src.data, context={_LOADER_CHECKS: True})
    except ValidationError as exc:
        errors += validation_messages(exc, Catalog, src)
    errors += _semantic_errors(src, sae_id, d_sae)
    if errors:
        raise CatalogError(f"{path}: {len(errors)} problem(s) in feature catalog:\n  "
                           + "\n  ".join(sort_messages(errors)))
    assert catalog is not None
    return catalog.with_source(path)


def _semantic_errors(src: YamlSource, sae_id: str | None, d_sae: int | None) -> list[str]:
    """Duplicates, SAE id and latent range, checked on the raw data so lines are exact."""
    data: dict[str, Any] = src.data
    errors: list[str] = []
    if sae_id is not None and isinstance(data.get("sae"), str) and data["sae"] != sae_id:
        errors.append(located(src, ("sae",), f"catalog is for SAE '{data['sae']}' but the SAE in "
                                             f"use is '{sae_id}'; load the catalog made for it"))
    features = data.get("features")
    if not isinstance(features, list):
        return errors
    first: dict[str, int] = {}
    for i, f in enumerate(features):
        if not isinstance(f, dict):
            continue
        name = f.get("name")
        if isinstance(name, str):
            if name in first:
                first_line = src.position(("features", first[name])).line
                errors.append(located(src, ("features", i, "name"), f"duplicate feature name "
                                      f"'{name}' (first defined at line {first_line}); rename one"))
            else:
                first[name] = i
        latent = f.get("latent")
        if d_sae is not None and isinstance(latent, int) and not isinstance(latent, bool) \
                and latent >= d_sae:
            errors.append(located(src, ("features", i, "latent"), f"latent {latent} is out of "
                                  f"range for SAE with {d_sae} latents (valid: 0..{d_sae - 1})"))
    return errors
