"""Moved to :mod:`monitor.evaluation.baselines` (importing this module warns; removed next release)."""

import warnings

from monitor.evaluation.baselines import (BanditFinding, PooledProbe, bandit_findings, bandit_flags, bandit_score,
                                          bandit_version, fit_pooled_probe, is_python, pooled_residual)
from monitor.evaluation.items import scan_ids

__all__ = ["BanditFinding", "PooledProbe", "bandit_findings", "bandit_flags", "bandit_score", "bandit_version",
           "fit_pooled_probe", "is_python", "pooled_residual", "scan_ids"]

warnings.warn("monitor.baselines moved to monitor.evaluation.baselines", DeprecationWarning, stacklevel=2)
