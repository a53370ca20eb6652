"""``sae-monitor eval`` in one call: load the model, SAE and policies, the items, evaluate, render."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monitor.activations import Progress
from monitor.errors import DataError
from monitor.evaluation.harness import evaluate
from monitor.evaluation.items import load_eval_items
from monitor.evaluation.render import render_json, render_markdown
from monitor.policy import PolicySet
from monitor.runtime.scan import check_dtype


def monitor_for_eval(policies: str | Path | None = None, *, sae: str | Path = "default",
                     model: str = "default", catalog: str | Path | None = None) -> tuple[Any, PolicySet]:
    """A :class:`Monitor` over ``policies`` (default: the shipped ones) and the policy set it
    was compiled from, as :func:`evaluate` needs both."""
    from monitor.catalog import load_catalog
    from monitor.models import load_model
    from monitor.policy import compile_policies, load_policies
    from monitor.sae import load_sae
    from monitor.runtime.hf import Monitor
    from monitor.shipped import catalog_beside, shipped_policies_dir

    model_obj, tokenizer = load_model(model)
    sae_obj = load_sae(sae)
    if catalog is None:
        catalog = catalog_beside(sae)
    cat = load_catalog(catalog, d_sae=sae_obj.cfg.d_sae) if catalog is not None else None
    policy_set = load_policies(policies if policies is not None else shipped_policies_dir())
    compiled = compile_policies(policy_set, cat, d_sae=sae_obj.cfg.d_sae)
    return Monitor(model_obj, tokenizer, sae=sae_obj, policies=compiled, catalog=cat), policy_set


def run_eval(data: str | Path, *, policies: str | Path | None = None, train: str | Path | None = None,
             limit: int | None = None, sae: str | Path = "default", model: str = "default",
             catalog: str | Path | None = None, as_json: bool = False, items: bool = False,
             progress: Progress | bool | None = None, group_by: str | None = "source",
             leave_one_out: str | None = None, benign: str | Path | None = None,
             batch_size: int = 8, dtype: str = "float32") -> str:
    """What ``sae-monitor eval`` prints: load, scan, measure, render.

    ``group_by`` (``--group-by``), ``leave_one_out`` (``--leave-one-out FIELD``), ``benign``
    (``--benign PATH``: a JSONL of ordinary traffic, e.g. from :mod:`monitor.evaluation.benign`)
    and ``dtype`` (``--dtype``, checked before the model loads) are passed to :func:`evaluate`.
    ``progress``: a ``(done, total)`` callback; a bool (the old signature) means no progress.
    """
    check_dtype(dtype)  # before loading the model
    for path in (data, train, benign):
        if path is not None and not Path(path).is_file():
            raise DataError(f"{path}: no such file")
    callback = progress if callable(progress) else None
    monitor, policy_set = monitor_for_eval(policies, sae=sae, model=model, catalog=catalog)
    try:
        test = load_eval_items(data, monitor.tokenizer, limit=limit)
        train_items = load_eval_items(train, monitor.tokenizer) if train else None
        benign_items = load_eval_items(benign, monitor.tokenizer, label=0) if benign else ()
        result = evaluate(monitor, test, policy_set=policy_set, train_items=train_items,
                          benign_items=benign_items, group_by=group_by, leave_one_out=leave_one_out,
                          progress=callback, batch_size=batch_size, dtype=dtype)
    finally:
        monitor.close()
    if as_json:
        return render_json(result, items=items)
    return render_markdown(result, title=f"Evaluation on {Path(data).name}")
