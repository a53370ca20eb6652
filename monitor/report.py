"""What one monitored call decided: the records that audit, metrics and logs read.

This module sits below every output module (``audit``, ``metrics``, ``logs``) and above the
policy engine: it knows hits, blocks and steering directives, nothing about models or engines.
It does not import torch at runtime (peaks are whatever tensors the runtime stored), so
tooling that only reads reports stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from monitor.policy import Hit, ReloadResult, SteerDirective

Outcome = Literal["allowed", "blocked", "steered", "error", "failed_open"]
OUTCOMES: tuple[Outcome, ...] = ("allowed", "blocked", "steered", "error", "failed_open")
Scope = Literal["prompt", "response"]


@dataclass(frozen=True)
class BlockInfo:
    """A row ended by a blocking rule. ``token_index`` counts tokens of ``scope`` from 0: the
    response keeps the tokens before it (a prompt block keeps none)."""

    row: int
    rule_id: str
    message: str
    scope: str
    token_index: int


@dataclass
class Report:
    """What happened during one monitored call (all rows of a batch)."""

    request_id: str
    policy_version: str
    hits: list[Hit] = field(default_factory=list)
    blocks: dict[int, BlockInfo] = field(default_factory=dict)
    steers: list[SteerDirective] = field(default_factory=list)
    row_outcomes: list[Outcome] = field(default_factory=list)
    error: str | None = None
    failed_open: bool = False
    tokens_monitored: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "response": 0})
    monitor_seconds: float = 0.0
    total_seconds: float = 0.0
    features: tuple[str, ...] = ()
    peaks: dict[str, torch.Tensor] = field(default_factory=dict)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, F] over monitored tokens
    counts: dict[str, torch.Tensor] = field(default_factory=dict)  # [B] monitored tokens

    def peak(self, feature: str, scope: str = "response", row: int = 0) -> float:
        """Highest activation of a watched feature over the monitored tokens of ``scope``
        (catalog name or ``latent:N``); 0.0 if no token of that scope was monitored."""
        if scope not in self.peaks:
            return 0.0
        return max(0.0, float(self.peaks[scope][row, self.features.index(feature)]))

    def peak_table(self, scope: str = "response", row: int = 0) -> dict[str, float]:
        """Every watched feature's peak in ``scope`` (see :meth:`peak`)."""
        return {name: self.peak(name, scope, row) for name in self.features}

    def means(self, scope: str = "response") -> torch.Tensor | None:
        """``[B, F]`` mean of every watched feature over the monitored tokens of ``scope`` per
        row (what a ``scope_mean`` test compares at the scope's last token); NaN for a row with
        no monitored token; None if nothing of ``scope`` was observed."""
        if scope not in self.sums:
            return None
        return self.sums[scope] / self.counts[scope].unsqueeze(-1)

    @property
    def outcome(self) -> Outcome:
        """The call's outcome: error > failed_open > blocked > steered > allowed."""
        if self.error and not self.failed_open:
            return "error"
        if self.failed_open:
            return "failed_open"
        if self.blocks:
            return "blocked"
        if self.steers or "steered" in self.row_outcomes:
            return "steered"
        return "allowed"


@dataclass(frozen=True)
class Decision:
    """One enforcement decision of a call, joined with the hit that caused it."""

    action: str  # "block" | "steer"
    rule: str
    row: int
    scope: str
    token_index: int
    hit: Hit | None
    steer: SteerDirective | None = None

    @property
    def feature(self) -> str | None:
        return self.hit.feature if self.hit is not None else None

    @property
    def activation(self) -> float | None:
        return self.hit.activation if self.hit is not None else None

    @property
    def alert(self) -> bool:
        """True when the deciding rule also carries an ``alert`` action."""
        return self.hit is not None and "alert" in self.hit.actions


def decisions(report: Report) -> Iterator[Decision]:
    """The blocks (by row) then the steering directives of ``report``."""
    for row in sorted(report.blocks):
        info = report.blocks[row]
        yield Decision("block", info.rule_id, row, info.scope, info.token_index,
                       driving_hit(report.hits, row, info.rule_id, info.token_index, info.scope,
                                   "block"))
    for d in report.steers:
        yield Decision("steer", d.rule_id, d.row, d.scope, d.token_index,
                       driving_hit(report.hits, d.row, d.rule_id, d.token_index, d.scope,
                                   "steer"), d)


def driving_hit(hits: Sequence[Hit], row: int, rule_id: str, token_index: int, scope: str,
                action: str) -> Hit | None:
    """The hit behind a decision: same row, rule, token and scope (else the rule's first hit
    on that row with that action)."""
    fallback = None
    for hit in hits:
        if hit.row == row and hit.rule_id == rule_id and action in hit.actions:
            if hit.token_index == token_index and hit.scope == scope:
                return hit
            fallback = fallback or hit
    return fallback


ReportCallback = Callable[[Report], Any]


def policy_store(monitor: Any) -> Any:
    """The monitor's policy store (:class:`~monitor.policy.PolicyStore`), or None when it was
    given a fixed compiled policy."""
    return getattr(monitor, "policy_store", None)


class ReportObserver:
    """Base of the output stages (audit trail, metrics, report logger): called with every
    finished :class:`Report`, and told of policy reloads once attached.

    :meth:`attach` is shared: it registers the observer as the monitor's callback and on its
    policy store's reloads, each once, whatever the engine adapter (anything with a
    ``callbacks`` list and a ``policy_store`` attribute).
    """

    def __call__(self, report: Report) -> None:
        raise NotImplementedError

    def observe_reload(self, result: ReloadResult, store: Any = None) -> None:
        """Called after every reload attempt of an attached monitor's policy store."""

    def attach(self, monitor: Any) -> Any:
        """Register on ``monitor`` (idempotent); returns ``self``."""
        if not any(existing is self for existing in monitor.callbacks):
            monitor.callbacks.append(self)
        store = policy_store(monitor)
        stores: list[Any] = self.__dict__.setdefault("_attached_stores", [])
        if store is not None and not any(s is store for s in stores):
            store.on_reload(lambda result, store=store: self.observe_reload(result, store))
            stores.append(store)
        return self
