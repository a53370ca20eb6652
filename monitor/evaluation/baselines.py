"""Baselines the monitor is measured against in ``sae-monitor eval``.

Two common alternatives to SAE-feature policies, each scored on exactly the tokens or lines an
evaluation item's scope covers:

* **a residual probe**: logistic regression on the raw residual stream at the SAE's own hook
  point, one vector per item (mean and max over the scoped tokens, concatenated), fitted on a
  training file. It answers "does the SAE basis lose anything a plain linear read-out of the
  same layer has?"; it is a per-item classifier, not something the monitor can run per token.
* **bandit**, the Python static analyser: a fixed tool, nothing is fitted. Score = the sum of
  severity weights (LOW 1, MEDIUM 2, HIGH 3) of the findings on the scoped lines; decision = a
  MEDIUM or HIGH finding there. Python only; rows in other languages are skipped and counted.

Neither baseline runs through the monitor; both read the same tokenisation
(:func:`monitor.evaluation.items.scan_window`) or the same lines as the monitor's scoring.
"""

from __future__ import annotations

import tempfile
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monitor.activations import Progress, identity, mean_max_pool, pool_windows
from monitor.capture import HookPoint
from monitor.evaluation.items import EvalItem, scan_window
from monitor.evaluation.measures import Detection
from monitor.probes import fit_logistic

SEVERITY_WEIGHT = {"LOW": 1.0, "MEDIUM": 2.0, "HIGH": 3.0}
PYTHON_NAMES = frozenset({"python", "py", "python3"})


# ------------------------------------------------------------------ residual probe


def pooled_features(model: torch.nn.Module, tokenizer: Any, point: HookPoint, items: Sequence[EvalItem], *,
                    batch_size: int = 8, progress: Progress | None = None) -> torch.Tensor:
    """``[n, 2 * d_model]``: per item, mean and max of the residual at ``point`` over the
    tokens its scan scope covers (:func:`~monitor.evaluation.items.scan_window`: position 0
    and special tokens left out, as the monitor leaves them out). An item without such a
    token gives zeros. Items go through in length-sorted, right-padded batches."""
    windows = [scan_window(tokenizer, item) for item in items]
    if not windows:
        return torch.zeros(0, 2 * int(getattr(model.config, "hidden_size", 0)))
    return pool_windows(model, windows, {point: identity}, pad_id=tokenizer.pad_token_id or 0,
                        pool=mean_max_pool, batch_size=batch_size, progress=progress)[point]


def pooled_residual(model: torch.nn.Module, tokenizer: Any, point: HookPoint, ids: Sequence[int],
                    start: int) -> torch.Tensor:
    """``[2 * d_model]`` for one tokenised item, response ``ids[start:]`` (one forward pass)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    window = (list(ids), [n >= max(start, 1) and t not in special for n, t in enumerate(ids)])
    return pool_windows(model, [window], {point: identity}, pool=mean_max_pool, batch_size=1)[point][0]


@dataclass(frozen=True)
class PooledProbe:
    """Logistic regression on pooled residual features: ``logit = x @ weight + bias``."""

    weight: torch.Tensor
    bias: float

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[n]`` for features ``[n, 2 * d_model]``; a logit > 0 is a positive decision."""
        return features.float() @ self.weight + self.bias


def fit_pooled_probe(features: torch.Tensor, labels: torch.Tensor, *, l2: float = 1e-2) -> PooledProbe:
    """Fit on ``features [n, D]`` and 0/1 ``labels [n]``; both classes weigh half.

    Raises ``ValueError`` unless both labels are present.
    """
    labels = torch.as_tensor(labels).float()
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if not n_pos or not n_neg:
        raise ValueError(f"a probe needs both labels; got {n_pos} positive and {n_neg} negative items")
    weight = torch.where(labels == 1, 0.5 / n_pos, 0.5 / n_neg)
    w, b = fit_logistic(features, labels, sample_weight=weight, l2=l2)
    return PooledProbe(w, b)


def probe_fitter(l2: float = 1e-2) -> Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """:func:`fit_pooled_probe` as a fitter for
    :func:`monitor.evaluation.transfer.leave_one_group_out`: ``(x, y) -> score``."""
    def fit(x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return fit_pooled_probe(x, y, l2=l2).score
    return fit


# ------------------------------------------------------------------ bandit


def is_python(language: str | None) -> bool:
    return (language or "").strip().lower() in PYTHON_NAMES


def bandit_version() -> str | None:
    """The installed bandit's version, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bandit")
    except PackageNotFoundError:
        return None


@dataclass(frozen=True)
class BanditFinding:
    line: int
    lines: tuple[int, ...]
    test_id: str
    severity: str
    confidence: str


def bandit_findings(snippets: Sequence[str]) -> list[list[BanditFinding] | None]:
    """Run bandit once over all snippets; per snippet its findings, or None when bandit could
    not parse it. Snippets are dedented first (functions cut from classes keep their indent);
    line numbers are those of the snippet as given.
    """
    with warnings.catch_warnings():  # bandit's plugin loading warns about its own arguments
        warnings.simplefilter("ignore", DeprecationWarning)
        from bandit.core import config, manager

    with tempfile.TemporaryDirectory(prefix="sae-monitor-bandit-") as tmp:
        paths = []
        for i, code in enumerate(snippets):
            path = Path(tmp) / f"snippet_{i:06d}.py"
            path.write_text(textwrap.dedent(code), encoding="utf-8")
            paths.append(str(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            mgr = manager.BanditManager(config.BanditConfig(), "file", quiet=True)
            mgr.discover_files(paths, recursive=False)
            mgr.run_tests()
        skipped = {Path(name).name for name, _reason in mgr.skipped}
        found: dict[str, list[BanditFinding]] = {}
        for issue in mgr.get_issue_list():
            lines = tuple(int(n) for n in (getattr(issue, "linerange", None) or [issue.lineno]))
            found.setdefault(Path(issue.fname).name, []).append(
                BanditFinding(int(issue.lineno), lines, str(issue.test_id), str(issue.severity).upper(),
                              str(issue.confidence).upper()))
    return [None if Path(p).name in skipped else found.get(Path(p).name, []) for p in paths]


def _in_scope(finding: BanditFinding, lines: frozenset[int]) -> bool:
    return not lines or any(n in lines for n in finding.lines)


def bandit_score(findings: Sequence[BanditFinding], lines: Sequence[int] = ()) -> float:
    """Sum of severity weights of the findings on ``lines`` (1-based; empty: every line)."""
    scope = frozenset(lines)
    return sum(SEVERITY_WEIGHT.get(f.severity, 1.0) for f in findings if _in_scope(f, scope))


def bandit_flags(findings: Sequence[BanditFinding], lines: Sequence[int] = ()) -> bool:
    """bandit's own decision: a MEDIUM or HIGH severity finding on ``lines``."""
    scope = frozenset(lines)
    return any(f.severity in ("MEDIUM", "HIGH") for f in findings if _in_scope(f, scope))


def bandit_detections(detections: dict[str, list[Detection]], items: Sequence[EvalItem],
                      notes: dict[str, list[str]]) -> list[str]:
    """Add bandit's :class:`Detection` to each category with Python rows; returns the notes
    for the whole run (``notes`` gets the per-category ones)."""
    version = bandit_version()
    if version is None:
        return ["bandit: not installed (pip install bandit); no bandit baseline"]
    python = [n for n, i in enumerate(items) if i.code is not None and is_python(i.language)]
    findings = bandit_findings([items[n].code or "" for n in python]) if python else []
    scores = torch.zeros(len(items), dtype=torch.float64)
    flags = torch.zeros(len(items), dtype=torch.bool)
    unparsed = 0
    for n, found in zip(python, findings):
        if found is None:
            unparsed += 1
            found = []
        scores[n] = bandit_score(found, items[n].code_lines)
        flags[n] = bandit_flags(found, items[n].code_lines)
    out = [f"bandit {version}: Python rows only, findings on the scoped lines"]
    if unparsed:
        out.append(f"bandit could not parse {unparsed} Python rows (scored 0)")
    checked = torch.zeros(len(items), dtype=torch.bool)
    checked[python] = True
    for category in detections:
        mine = torch.tensor([i.category == category for i in items], dtype=torch.bool)
        covered = checked & mine
        if not bool(covered.any()):
            continue
        n, total = int(covered.sum()), int(mine.sum())
        if n < total:
            notes[category].append(f"bandit skipped {total - n} non-Python rows")
        detections[category].append(Detection.single(f"bandit (Python rows only: {n} of {total})",
                                                     "a MEDIUM/HIGH finding in scope", scores, flags, covered))
    return out
