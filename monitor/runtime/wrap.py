"""Building a monitored model: ``monitor.wrap``, ``Monitor.from_default``, pipelines."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from torch import nn

from monitor.catalog import Catalog, load_catalog
from monitor.errors import MonitorError
from monitor.policy import CompiledPolicy, PolicyStore
from monitor.report import Report
from monitor.runtime.hf import Monitor
from monitor.sae import SAE, load_sae
from monitor.shipped import catalog_beside, shipped_policies_dir

if TYPE_CHECKING:
    from transformers import Pipeline

PolicySource = PolicyStore | CompiledPolicy | str | Path | Sequence[str | Path]


def resolve_catalog(sae: SAE, sae_source: SAE | str | Path, catalog: Catalog | str | Path | None) -> Catalog | None:
    """The catalog given, else the one stored beside the SAE (however the SAE was named: a
    shipped name, a path, or an SAE object loaded from a directory), else None."""
    if isinstance(catalog, Catalog):
        return catalog
    if catalog is None:
        source = sae_source if not isinstance(sae_source, SAE) else sae.source_path
        catalog = catalog_beside(source)
    return load_catalog(catalog, d_sae=sae.cfg.d_sae) if catalog is not None else None


def from_parts(model: nn.Module, tokenizer: Any, *, sae: SAE | str | Path = "default",
               policies: PolicySource | None = None, catalog: Catalog | str | Path | None = None,
               **options: Any) -> Monitor:
    """A :class:`Monitor` from a model, its tokenizer and the names or objects of the SAE,
    catalog and policies (the shipped ones by default)."""
    sae_obj = sae if isinstance(sae, SAE) else load_sae(sae)
    cat = resolve_catalog(sae_obj, sae, catalog)
    if policies is None:
        policies = shipped_policies_dir()
    store = policies if isinstance(policies, (PolicyStore, CompiledPolicy)) else PolicyStore(policies, cat, sae_obj.cfg.d_sae)
    return Monitor(model, tokenizer, sae=sae_obj, policies=store, catalog=cat, **options)


def from_default(**options: Any) -> Monitor:
    """The embedded default model, the shipped SAE, its catalog and the shipped policies."""
    from monitor.models import load_default_model

    model, tokenizer = load_default_model()
    return from_parts(model, tokenizer, **options)


Monitor.from_default = staticmethod(from_default)


class MonitoredPipeline:
    """A ``transformers`` text-generation pipeline whose model generates under policy.

    Calls go to the wrapped pipeline unchanged; its ``model.generate`` is the monitor's, so
    the pipeline's outputs keep their usual shape (blocked rows carry the rule's message).
    """

    def __init__(self, pipe: Any, monitor: Monitor) -> None:
        self.pipeline = pipe
        self.monitor = monitor
        pipe.model.generate = monitor.generate

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.pipeline(*args, **kwargs)

    @property
    def last_report(self) -> Report:
        """The report of this thread's last call (see :attr:`Monitor.last_report`)."""
        return self.monitor.last_report

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)


@overload
def wrap(model_or_pipeline: Pipeline, tokenizer: Any = None, **options: Any) -> MonitoredPipeline: ...
@overload
def wrap(model_or_pipeline: nn.Module, tokenizer: Any, **options: Any) -> Monitor: ...
@overload
def wrap(model_or_pipeline: Any, tokenizer: Any = None, **options: Any) -> Monitor | MonitoredPipeline: ...
def wrap(model_or_pipeline: Any, tokenizer: Any = None, **options: Any) -> Monitor | MonitoredPipeline:
    """Put a model (with its tokenizer) or a text-generation pipeline under policy.

    Options: ``sae`` (an SAE, a path, or "default"), ``policies`` (files, a directory, a
    PolicyStore or a CompiledPolicy; default: the shipped policies), ``catalog`` (default: the
    one beside the SAE), and any :class:`Monitor` keyword (``on_error``, ``block_behavior``,
    ``callbacks``, ...).
    """
    if hasattr(model_or_pipeline, "model") and hasattr(model_or_pipeline, "tokenizer") and callable(model_or_pipeline):
        pipe = model_or_pipeline
        return MonitoredPipeline(pipe, from_parts(pipe.model, tokenizer or pipe.tokenizer, **options))
    if tokenizer is None:
        raise MonitorError("wrap(model, tokenizer, ...) needs the tokenizer (or pass a pipeline)")
    return from_parts(model_or_pipeline, tokenizer, **options)
