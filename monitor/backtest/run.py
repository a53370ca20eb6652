"""Running a backtest locally: read -> scan -> commit chunks -> merge -> summary.

:func:`run_backtest` is the Python API behind ``sae-monitor backtest``. The same per-batch
function (:func:`scan_records`) runs here in-process and inside each Ray actor
(:mod:`monitor.backtest.ray_runner`), so both paths write identical results.

Progress goes to an optional callback ``progress(records_done, tokens_done)`` (a tqdm bar in the
CLI); the library never prints.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.backtest.policies import PolicyVersion, resolve
from monitor.backtest.read import Conversation, FieldMap, Problem, Record, expand, read_records
from monitor.backtest.results import ResultStore, to_row
from monitor.backtest.scan import MAX_BATCH_TOKENS, Scanner, check_dtype
from monitor.backtest.summary import summarize
from monitor.catalog import Catalog

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Parts:
    """What a scanner needs: the model, its tokenizer, the SAE and the catalog (or None)."""

    model: Any
    tokenizer: Any
    sae: Any
    catalog: Catalog | None


def default_parts(device: str | None = None) -> Parts:
    """The embedded default model, the shipped SAE and its catalog (on ``device`` if given)."""
    from monitor.catalog import load_catalog
    from monitor.models import load_default_model
    from monitor.sae import load_sae
    from monitor.shipped import SHIPPED_CATALOG

    model, tokenizer = load_default_model()
    sae = load_sae("default")
    if device:
        model, sae = model.to(device), sae.to(device)
    catalog = load_catalog(SHIPPED_CATALOG, d_sae=sae.cfg.d_sae) if SHIPPED_CATALOG.is_file() else None
    return Parts(model, tokenizer, sae, catalog)


@dataclass(frozen=True)
class BacktestConfig:
    """One backtest job. ``data``: files, directories or globs; ``policies``: the candidate
    policy directory; ``against``: a baseline directory or git revision; ``out``: the results
    directory (resumed if it holds a run of the same versions). ``batch_size``: conversations
    per forward, at most ``max_batch_tokens`` padded tokens; ``chunk_size``: records per
    committed chunk (the most a kill can lose and redo). ``include_text``: keep each conversation's text in the results and examples (off:
    only its ``sha256``). ``max_tokens``: skip longer conversations (default: the context).
    ``dtype``: the forward's precision, ``float32`` (default: exactly ``Monitor.scan``'s) or
    ``bfloat16`` (autocast; faster, results differ by rounding: see :mod:`monitor.backtest.scan`);
    another value raises :class:`~monitor.backtest.scan.DtypeError`."""

    data: Sequence[str]
    policies: str
    out: str
    against: str | None = None
    batch_size: int = 16
    chunk_size: int = 256
    max_tokens: int | None = None
    max_batch_tokens: int = MAX_BATCH_TOKENS
    include_text: bool = False
    fields: FieldMap = field(default_factory=FieldMap)
    examples: int = 3
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_dtype(self.dtype)


@dataclass(frozen=True)
class BacktestOutcome:
    """The merged result rows, the summary (see :func:`monitor.backtest.summary.summarize`)
    and where the files are."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    out: Path


def scan_records(scanner: Scanner, records: Sequence[Record], labels: Sequence[str],
                 include_text: bool = False) -> list[dict[str, Any]]:
    """Result rows for ``records`` (same order): problems pass through, conversations are
    scanned together in batches. The one batch function of the local and the Ray path."""
    convs = [r for r in records if isinstance(r, Conversation)]
    scanned = iter(scanner.scan(convs))
    rows = []
    for record in records:
        if isinstance(record, Problem):
            rows.append(to_row(record, labels))
            continue
        item = next(scanned)
        rows.append(to_row(item, labels, record.messages if include_text else None))
    return rows


def _chunks(records: Iterable[Record], size: int) -> Iterable[list[Record]]:
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def prepare(config: BacktestConfig, parts: Parts, resume: bool = True
            ) -> tuple[list[PolicyVersion], ResultStore, list[Path]]:
    """Compile the versions, open (or resume) the results and list the input files; every
    configuration error surfaces here, before any scanning."""
    versions = resolve(config.policies, config.against, parts.catalog, parts.sae.cfg.d_sae)
    paths = expand(config.data)
    store = ResultStore(config.out, [v.describe() for v in versions], resume=resume, dtype=config.dtype)
    return versions, store, paths


def finish(config: BacktestConfig, versions: Sequence[PolicyVersion], store: ResultStore) -> BacktestOutcome:
    """Merge the committed chunks and write ``summary.json``."""
    rows = store.finalize()
    summary = summarize(rows, store.labels, [v.describe() for v in versions], examples=config.examples)
    summary["dtype"] = config.dtype  # the forward's precision: results of different ones are not comparable
    (store.out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return BacktestOutcome(rows, summary, store.out)


def run_backtest(config: BacktestConfig, parts: Parts | None = None, *, progress: Progress | None = None,
                 resume: bool = True) -> BacktestOutcome:
    """Backtest ``config`` in this process (see the module doc); resumes an interrupted run
    in ``config.out`` without scanning a committed record again."""
    parts = parts or default_parts()
    versions, store, paths = prepare(config, parts, resume)
    scanner = Scanner(parts.model, parts.tokenizer, parts.sae, [v.policy for v in versions], parts.catalog,
                      batch_size=config.batch_size, max_tokens=config.max_tokens,
                      max_batch_tokens=config.max_batch_tokens, dtype=config.dtype)
    for chunk in _chunks(read_records(paths, config.fields, skip=store.done), config.chunk_size):
        rows = scan_records(scanner, chunk, store.labels, config.include_text)
        store.commit(rows)
        if progress is not None:
            progress(len(rows), sum(r["tokens"] or 0 for r in rows))
    return finish(config, versions, store)
