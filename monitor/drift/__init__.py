"""Fine-tuning drift: did a fine-tune make the model more likely to do what the policies watch for?

``monitor.drift.drift(base, [candidate, ...])`` compares each candidate (a full checkpoint or a
PEFT/LoRA adapter over the base; several = a checkpoint series) with the base under the same
SAE and policies, behaviourally (answers to prompts: rule firing rates, feature activations)
and teacher-forced (the same tokens through both: per-latent change, the activation-difference
lens, next-token KL, the SAE's FVU under each; optionally the shift along minimal pairs' concept
direction and the change of preference for their concept side), with bootstrap intervals, paired permutation
tests and Benjamini–Hochberg, and returns a typed :class:`DriftResult`.

Modules, one per stage: :mod:`~monitor.drift.load` (inputs checked before any model work,
models and adapters loaded), :mod:`~monitor.drift.inputs` (prompts and texts),
:mod:`~monitor.drift.behaviour`, :mod:`~monitor.drift.teacher`, :mod:`~monitor.drift.stats`,
:mod:`~monitor.drift.verdict`, :mod:`~monitor.drift.direction`,
:mod:`~monitor.drift.preference`, :mod:`~monitor.drift.run` (the orchestration),
:mod:`~monitor.drift.render` (table, JSON, HTML).
"""

import sys as _sys
import types as _types
from typing import Any

from monitor.drift.load import DriftInputError
from monitor.drift.result import (FVU, KL, CandidateDrift, DriftResult, FeatureDrift, LatentShift, Lens,
                                  LensEntry, PreferenceDrift, RuleDrift, Verdict)
from monitor.drift.run import Options, drift

__all__ = ["FVU", "KL", "CandidateDrift", "DriftInputError", "DriftResult", "FeatureDrift", "LatentShift",
           "Lens", "LensEntry", "Options", "PreferenceDrift", "RuleDrift", "Verdict", "drift"]


class _CallableModule(_types.ModuleType):
    """Lets ``monitor.drift(...)`` call :func:`drift` while ``monitor.drift`` stays the package
    (``monitor.drift.load`` etc.); typed code can call ``monitor.drift.drift(...)``."""

    def __call__(self, *args: Any, **kwargs: Any) -> DriftResult:
        return drift(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
