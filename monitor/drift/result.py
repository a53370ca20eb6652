"""The typed result of a drift check (frozen dataclasses) and its JSON form.

``DriftResult.to_dict()`` is the ``--json`` output: per candidate, ``rules`` (``id,
base_rate, candidate_rate, delta, ci_low, ci_high, p_value, verdict``), ``features``,
``latents_up``, ``latents_down``, ``lens``, ``fvu``, ``kl`` and the drift score. Prompt,
response and context text is left out unless the caller asks for it (``include_text``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Verdict = Literal["increased", "unchanged", "decreased"]


@dataclass(frozen=True)
class RuleDrift:
    """One rule's firing rate (share of answers where it fired at least once) under each model,
    over all prompts and passes. ``ci_low``/``ci_high`` bound ``delta`` (bootstrap over prompts),
    ``p_value`` is the paired permutation test, ``q_value`` its BH adjustment."""

    id: str
    mode: str
    base_rate: float
    candidate_rate: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    q_value: float
    verdict: Verdict


@dataclass(frozen=True)
class FeatureDrift:
    """One catalog feature (latent or probe). ``base_mean``/``candidate_mean``/``delta`` and the
    interval, tests and verdict are teacher-forced (same tokens under both models, mean over
    each item's scored tokens). ``*_response_mean``/``*_response_peak`` are behavioural: over
    each model's own answers (mean of per-answer mean / peak). ``t`` is the paired t statistic;
    ``beyond_null`` says whether ``|t|`` exceeds the random-latent null."""

    name: str
    kind: Literal["latent", "probe"]
    latent: int | None
    base_mean: float
    candidate_mean: float
    delta: float
    ci_low: float
    ci_high: float
    t: float
    p_value: float
    q_value: float
    beyond_null: bool
    verdict: Verdict
    base_response_mean: float
    candidate_response_mean: float
    base_response_peak: float
    candidate_response_peak: float


@dataclass(frozen=True)
class LatentShift:
    """A latent whose teacher-forced mean activation moved (BH-significant), with its catalog
    name when it has one and top contexts (under the model where it is higher)."""

    latent: int
    name: str | None
    base_mean: float
    candidate_mean: float
    delta: float
    t: float
    p_value: float
    q_value: float
    contexts: tuple[str, ...] = ()


@dataclass(frozen=True)
class LensEntry:
    """A latent or probe the activation-difference direction points to: ``cosine`` with its
    decoder row (probe: weight vector), ``percentile`` among all latents' |cosine|."""

    name: str
    latent: int | None
    cosine: float
    percentile: float


@dataclass(frozen=True)
class Lens:
    """The activation-difference lens: the mean residual difference (candidate − base) over
    the first ``tokens`` tokens of the texts, read in the SAE basis."""

    tokens: int
    norm: float
    relative_norm: float        # norm / mean residual norm of the base at those tokens
    top_latents: tuple[LensEntry, ...]
    features: tuple[LensEntry, ...]


@dataclass(frozen=True)
class FVU:
    base: float
    candidate: float
    worse: bool                 # the candidate's FVU is clearly worse (latent changes are suspect)


@dataclass(frozen=True)
class KL:
    """Per-token KL(base || candidate) of next-token distributions, first ``tokens`` tokens."""

    tokens: int
    mean: float
    ci_low: float
    ci_high: float
    per_position: tuple[float, ...]


@dataclass(frozen=True)
class DirectionDrift:
    """The teacher-forced shift (candidate − base) of the items' mean residuals along a concept
    direction from minimal pairs (:mod:`monitor.drift.direction`). ``delta`` is in residual
    units, ``relative`` (and its interval) in units of the pairs' own ``separation`` (1.0 = as
    far as from the contrast side to the concept side); ``null_delta`` is the 95th percentile
    of the absolute mean shift along random active latents' decoder rows, ``score`` is
    ``delta / null_delta`` (0 when negative; above 1 = moved more along the concept than along
    95% of random directions); ``t`` the paired t statistic of the shift."""

    name: str
    source: str
    pairs: int
    separation: float
    base_projection: float
    candidate_projection: float
    delta: float
    relative: float
    ci_low: float
    ci_high: float
    t: float
    null_delta: float
    p_value: float
    score: float
    verdict: Verdict


@dataclass(frozen=True)
class PreferenceDrift:
    """The candidate's change of preference for the concept side of minimal pairs
    (:mod:`monitor.drift.preference`): ``delta`` is the mean over pairs of the change of
    ``log p(concept) − log p(contrast)`` in nats (> 0: the candidate prefers the concept side
    more than the base did), with a bootstrap interval, the share of pairs that moved that way,
    the base's own mean margin, and the paired sign-flip p-value over pairs."""

    name: str
    source: str
    pairs: int
    delta: float
    ci_low: float
    ci_high: float
    share_up: float
    base_margin: float
    p_value: float
    verdict: Verdict


@dataclass(frozen=True)
class CandidateDrift:
    """Everything measured for one candidate against the base."""

    candidate: str
    rules: tuple[RuleDrift, ...]
    features: tuple[FeatureDrift, ...]
    latents_up: tuple[LatentShift, ...]
    latents_down: tuple[LatentShift, ...]
    n_latents_up: int
    n_latents_down: int
    null_t: float
    lens: Lens
    fvu: FVU
    kl: KL
    drift_score: float
    directions: tuple[DirectionDrift, ...] = ()
    preferences: tuple[PreferenceDrift, ...] = ()
    warnings: tuple[str, ...] = ()
    responses: tuple[tuple[str, ...], ...] = ()   # [pass][prompt], candidate's answers
    seconds: float = 0.0

    @property
    def enforce_increased(self) -> tuple[str, ...]:
        """Ids of enforce rules whose firing rate increased."""
        return tuple(r.id for r in self.rules if r.mode == "enforce" and r.verdict == "increased")


@dataclass(frozen=True)
class DriftResult:
    """A drift check of one or more candidates (a checkpoint series, in order) against a base."""

    base: str
    candidates: tuple[CandidateDrift, ...]
    fdr: float
    settings: dict[str, Any] = field(default_factory=dict)
    base_responses: tuple[tuple[str, ...], ...] = ()
    prompts: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        """1 when any candidate increased an enforce rule's firing rate (a CI gate), else 0."""
        return 1 if any(c.enforce_increased for c in self.candidates) else 0

    def to_dict(self, *, include_text: bool = False) -> dict[str, Any]:
        cands = []
        for c in self.candidates:
            d = asdict(c)
            d["enforce_increased"] = list(c.enforce_increased)
            if not include_text:
                d.pop("responses")
                for key in ("latents_up", "latents_down"):
                    for entry in d[key]:
                        entry.pop("contexts")
            cands.append(d)
        out: dict[str, Any] = {"base": self.base, "fdr": self.fdr, "settings": self.settings,
                               "exit_code": self.exit_code, "candidates": cands}
        if include_text:
            out["prompts"] = list(self.prompts)
            out["base_responses"] = [list(p) for p in self.base_responses]
        return out
