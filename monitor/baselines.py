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

Neither baseline runs through :class:`~monitor.wrapper.Monitor`; both read the same
tokenisation (:func:`scan_ids`) or the same lines as the monitor's scoring.
"""

from __future__ import annotations

import tempfile
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monitor.data import token_ids
from monitor.capture import HookPoint, capture
from monitor.probes import fit_logistic

SEVERITY_WEIGHT = {"LOW": 1.0, "MEDIUM": 2.0, "HIGH": 3.0}
PYTHON_NAMES = frozenset({"python", "py", "python3"})


# ------------------------------------------------------------------ tokenisation



def scan_ids(tokenizer: Any, text: str | Sequence[dict[str, str]], prompt: str | None = None
             ) -> tuple[list[int], int]:
    """``(ids, prompt_len)`` exactly as :meth:`Monitor.scan` tokenises ``text``/``prompt``:
    the response is ``ids[prompt_len:]``.

    Kept in step with ``Monitor.scan`` by ``tests/test_baselines.py``, which compares both.
    """
    if isinstance(text, str):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        response_ids = tokenizer(text, add_special_tokens=not prompt)["input_ids"]
    else:
        messages = list(text)
        if messages and messages[-1].get("role") == "assistant":
            prompt_ids = token_ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                                               tokenize=True))
            response_ids = token_ids(tokenizer.apply_chat_template(messages, tokenize=True))[len(prompt_ids):]
        else:
            prompt_ids, response_ids = token_ids(tokenizer.apply_chat_template(messages, tokenize=True)), []
    return list(prompt_ids) + list(response_ids), len(prompt_ids)


# ------------------------------------------------------------------ residual probe


@torch.no_grad()
def pooled_residual(model: torch.nn.Module, tokenizer: Any, point: HookPoint, ids: Sequence[int],
                    start: int) -> torch.Tensor:
    """``[2 * d_model]``: mean and max of the residual at ``point`` over ``ids[start:]``.

    Position 0 and special tokens are left out, as the monitor leaves them out. An item with
    no such token gives zeros.
    """
    tensor = torch.tensor([list(ids)], dtype=torch.long)
    resid = capture(model, tensor, point)[0].float()  # [T, d]
    keep = torch.zeros(len(ids), dtype=torch.bool)
    keep[max(start, 1):] = True
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long)
    if special.numel():
        keep &= ~torch.isin(tensor[0], special)
    if not bool(keep.any()):
        return torch.zeros(2 * resid.shape[-1])
    chosen = resid[keep]
    return torch.cat([chosen.mean(0), chosen.amax(0)])


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
