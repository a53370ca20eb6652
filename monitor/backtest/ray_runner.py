"""The same backtest on a Ray cluster, through Ray Data.

Pipeline: the input files (one dataset row per file shard, so that even one file feeds every
actor) -> ``flat_map`` parses each shard into records (problems included, already-committed keys
skipped) -> ``map_batches`` over an actor pool of
:class:`ScanActor` (each actor loads one model + SAE once, on a GPU when the cluster has them,
and calls the local path's batch function :func:`monitor.backtest.run.scan_records`) -> rows
streamed back to the driver, which commits them in chunks through the same
:class:`~monitor.backtest.results.ResultStore`. The merged output is therefore the local path's.

Failures: Ray Data restarts a dead actor and retries its batch (``max_restarts=-1``,
``max_task_retries=-1``, Ray Data's defaults for actor pools); a batch's rows reach the driver
only from a task that finished, and the store commits each key once, so a killed worker neither
loses a conversation nor counts one twice. A killed *driver* resumes like a local run.

Input files must be readable at the same path on every node (a shared filesystem), since each
file is opened by the task that parses it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monitor.backtest.policies import PolicyVersion
from monitor.backtest.read import FieldMap, read_file, record_from_json, record_to_json
from monitor.backtest.results import ResultStore
from monitor.backtest.scan import MAX_BATCH_TOKENS, check_dtype
from monitor.errors import MonitorError
from monitor.policy import CompiledPolicy

PartsFactory = Callable[[], Any]


class ReadShard:
    """flat_map function: one (file, shard, shards) row -> the shard's records as JSON strings:
    every ``shards``-th record of the file, from the ``shard``-th. Each file is parsed once per
    shard (cheap next to scanning) so that one big file still feeds every actor: Ray Data hands
    an actor whole blocks, and one file's records would otherwise be one block, i.e. one actor."""

    def __init__(self, fields: FieldMap, done: frozenset[str]) -> None:
        self.fields, self.done = fields, done

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        shard, shards = int(row["shard"]), int(row["shards"])
        records = read_file(Path(row["path"]), self.fields, self.done)
        return [{"record": record_to_json(r)} for n, r in enumerate(records) if n % shards == shard]


def read_tasks(paths: Sequence[Path], workers: int) -> list[dict[str, Any]]:
    """The read tasks: each file split into enough shards for at least two blocks per worker."""
    shards = max(1, -(-2 * workers // max(1, len(paths))))
    return [{"path": str(p), "shard": k, "shards": shards} for p in paths for k in range(shards)]


class ScanActor:
    """One Ray actor: builds its model + SAE once with ``factory``, then scans batches."""

    def __init__(self, factory: PartsFactory, policies: Sequence[CompiledPolicy], labels: Sequence[str],
                 batch_size: int, max_tokens: int | None, include_text: bool, device: str | None,
                 max_batch_tokens: int = MAX_BATCH_TOKENS, dtype: str = "float32") -> None:
        import torch

        from monitor.backtest.scan import Scanner

        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        parts = factory()
        model, sae = parts.model, parts.sae
        if device:
            model, sae = model.to(device), sae.to(device)
        self.labels, self.include_text = list(labels), include_text
        self.scanner = Scanner(model, parts.tokenizer, sae, policies, parts.catalog, batch_size=batch_size,
                               max_tokens=max_tokens, max_batch_tokens=max_batch_tokens, dtype=dtype)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from monitor.backtest.run import scan_records

        records = [record_from_json(str(x)) for x in batch["record"]]
        rows = scan_records(self.scanner, records, self.labels, self.include_text)
        return {"key": np.array([r["key"] for r in rows], dtype=object),
                "row": np.array([json.dumps(r, ensure_ascii=False) for r in rows], dtype=object)}


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (``auto``, ``ray://host:10001``, ``host:6379``), or start a
    local runtime when None. Workers of a runtime started here import ``monitor`` from where this
    process does (so a source checkout runs its own code)."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MonitorError("--ray needs Ray Data, which is not installed: pip install 'sae-monitor[ray]'") from None
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
        return
    import monitor

    root = str(Path(monitor.__file__).resolve().parent.parent)
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(num_cpus=num_cpus, runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}},
             include_dashboard=False, log_to_driver=False)


def run_on_ray(paths: Sequence[Path], versions: Sequence[PolicyVersion], store: ResultStore, *,
               factory: PartsFactory, workers: int, batch_size: int, chunk_size: int,
               max_tokens: int | None = None, max_batch_tokens: int = MAX_BATCH_TOKENS,
               include_text: bool = False, fields: FieldMap | None = None,
               progress: Callable[[int, int], None] | None = None, dtype: str = "float32") -> None:
    """Scan every not-yet-committed record of ``paths`` on the connected cluster with
    ``workers`` actors (one GPU each when the cluster has GPUs, each running its forwards at
    ``dtype``, see :class:`~monitor.backtest.scan.Scanner`) and commit the rows."""
    check_dtype(dtype)  # refused here, not in every actor
    import ray
    import ray.data

    gpus = float(ray.cluster_resources().get("GPU", 0)) > 0
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    tasks = read_tasks(paths, workers)
    ds: Any = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
    ds = ds.flat_map(ReadShard(fields or FieldMap(), store.done))
    ds = ds.map_batches(ScanActor, batch_size=max(batch_size, 1) * 4, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=workers),
                        fn_constructor_kwargs=dict(factory=factory, policies=[v.policy for v in versions],
                                                   labels=store.labels, batch_size=batch_size,
                                                   max_tokens=max_tokens, max_batch_tokens=max_batch_tokens,
                                                   include_text=include_text, dtype=dtype,
                                                   device="cuda" if gpus else None),
                        num_gpus=1 if gpus else 0, num_cpus=1)
    pending: list[dict[str, Any]] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        pending += [json.loads(str(x)) for x in batch["row"]]
        if len(pending) >= chunk_size:
            _commit(store, pending, progress)
            pending = []
    if pending:
        _commit(store, pending, progress)


def _commit(store: ResultStore, rows: list[dict[str, Any]], progress: Callable[[int, int], None] | None) -> None:
    store.commit(rows)
    if progress is not None:
        progress(len(rows), sum(r["tokens"] or 0 for r in rows))
