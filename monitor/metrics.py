"""Prometheus metrics: every instrument sae-monitor exports, defined in one place.

One-way flow: a finished call's :class:`~monitor.report.Report` -> :class:`MonitorMetrics`
(a Monitor callback) -> the injected registry -> exposition (``/metrics`` in
:mod:`monitor.serve`, or ``prometheus_client.start_http_server``). Nothing here reads the
model or the policy engine.

Labels come only from bounded sets: outcomes, scopes and reload results are fixed
vocabularies; rule ids and severities come from the loaded policy files; feature names come
from the catalog (``Hit.feature`` values that are raw ``latent:N`` labels are not observed, so
a policy over thousands of raw latents cannot explode the series count). Prompt or response
text, request ids and anything else a user controls never become a label.

Metric names (all prefixed ``sae_monitor_``; counters are exposed with ``_total``)::

    requests_total{outcome}                      allowed | blocked | steered | error | failed_open
    tokens_monitored_total{scope}                prompt | response
    rule_triggers_total{rule,action,severity,mode}  one per hit and per action kind of the rule
    blocks_total{rule}                           one per blocked row
    steering_interventions_total{rule}           one per (row, rule) that steered
    feature_activation{feature}                  histogram of the driving activation of hits
    monitor_overhead_seconds_per_token           histogram: monitor time / monitored tokens
    policy_reloads_total{result}                 success | failure
    build_info{version,policy_version,sae}       info metric, value 1
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, Info

from monitor.version import __version__
from monitor.report import OUTCOMES, Report, ReportObserver

if TYPE_CHECKING:
    from monitor.catalog import Catalog
    from monitor.policy import CompiledPolicy, ReloadResult
    from monitor.sae import SAE

PREFIX = "sae_monitor"
SCOPES = ("prompt", "response")
RELOAD_RESULTS = ("success", "failure")
# Per-token monitoring cost: tens of microseconds (a few latents) to tens of milliseconds.
OVERHEAD_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                    5e-2, 0.1, 0.25)
ACTIVATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
_RAW_LATENT = re.compile(r"^latent:\d+$")


def is_catalog_feature(label: str) -> bool:
    """True for a catalog feature name, False for a raw ``latent:N`` label."""
    return bool(label) and not _RAW_LATENT.match(label)


def sae_identity(sae: SAE | None, catalog: Catalog | None = None) -> str:
    """A short, stable id for the SAE in use, for the build info metric.

    The catalog's ``sae`` id when there is a catalog (it names the SAE it was made for), else
    ``metadata["id"]`` of the SAE config, else ``<architecture>-<d_sae>@<hook_name>``.
    """
    name = getattr(catalog, "sae", None) if catalog is not None else None
    if name:
        return str(name)
    cfg = getattr(sae, "cfg", None)
    if cfg is None:
        return "unknown"
    meta = getattr(cfg, "metadata", None) or {}
    if meta.get("id"):
        return str(meta["id"])
    return f"{cfg.architecture}-{cfg.d_sae}@{cfg.hook_name or 'unknown'}"


class MonitorMetrics(ReportObserver):
    """All sae-monitor instruments, registered in ``registry`` (the default registry if None).

    Use an instance as a Monitor callback (``Monitor(..., callbacks=[metrics])`` or
    :meth:`attach`) and subscribe :meth:`observe_reload` to policy reloads. Creating two
    instances on the same registry raises ``ValueError`` (duplicate timeseries), as
    prometheus_client does for any metric: give each its own :class:`CollectorRegistry`.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = REGISTRY if registry is None else registry
        reg = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Monitored calls by outcome (a block is an "
                                "outcome, not an error).", ["outcome"], registry=reg)
        self.tokens = Counter(f"{PREFIX}_tokens_monitored", "Tokens evaluated against the "
                              "policies, by scope.", ["scope"], registry=reg)
        self.rule_triggers = Counter(f"{PREFIX}_rule_triggers", "Rule hits (one per token that "
                                     "fired), counted once per action kind of the rule.",
                                     ["rule", "action", "severity", "mode"], registry=reg)
        self.blocks = Counter(f"{PREFIX}_blocks", "Rows blocked, by the rule that blocked them.",
                              ["rule"], registry=reg)
        self.steers = Counter(f"{PREFIX}_steering_interventions", "Rows steered, per rule.",
                              ["rule"], registry=reg)
        self.feature_activation = Histogram(f"{PREFIX}_feature_activation", "Activation of the "
                                            "catalog feature that drove each hit.", ["feature"],
                                            buckets=ACTIVATION_BUCKETS, registry=reg)
        self.overhead = Histogram(f"{PREFIX}_monitor_overhead_seconds_per_token", "Monitoring "
                                  "time of a call divided by the tokens it monitored.",
                                  buckets=OVERHEAD_BUCKETS, registry=reg)
        self.reloads = Counter(f"{PREFIX}_policy_reloads", "Policy reload attempts by result.",
                               ["result"], registry=reg)
        self.build = Info(f"{PREFIX}_build", "sae-monitor version, active policy version and SAE.",
                          registry=reg)
        # Known label values start at zero, so rate() and alerts see them before the first event.
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        for scope in SCOPES:
            self.tokens.labels(scope=scope)
        for result in RELOAD_RESULTS:
            self.reloads.labels(result=result)
        self._sae = "unknown"
        self._policy_version = "unknown"
        self._set_build()

    # ------------------------------------------------------------------ wiring
    def set_build(self, *, policy_version: str | None = None, sae: str | None = None) -> None:
        """Update the ``sae_monitor_build_info`` labels (unchanged fields keep their value)."""
        if policy_version is not None:
            self._policy_version = policy_version
        if sae is not None:
            self._sae = sae
        self._set_build()

    def _set_build(self) -> None:
        self.build.info({"version": __version__, "policy_version": self._policy_version,
                         "sae": self._sae})

    def attach(self, monitor: Any, *, sae_id: str | None = None) -> MonitorMetrics:
        """Register on ``monitor`` (as a report callback and on its policy reloads, see
        :meth:`ReportObserver.attach`), start every rule's series at zero and fill the build
        info. Idempotent; returns ``self``."""
        super().attach(monitor)
        self.declare_rules(monitor.policy)
        self.set_build(policy_version=monitor.policy.version_id,
                       sae=sae_id or sae_identity(monitor.sae, monitor.catalog))
        return self

    def declare_rules(self, policy: CompiledPolicy) -> None:
        """Start the series of every rule and catalog feature in ``policy`` at zero.

        Why: a counter first scraped at 1 has no increase to Prometheus, so without this the
        first block of each rule would be invisible to ``rate()``, ``increase()`` and alerts.
        """
        for feature in policy.features:
            if is_catalog_feature(feature.label):
                self.feature_activation.labels(feature=feature.label)
        for rule in policy.rules:
            for action in rule.actions or ("none",):
                self.rule_triggers.labels(rule=rule.id, action=action, severity=rule.severity,
                                          mode=rule.mode)
            if rule.enforced and "block" in rule.actions:
                self.blocks.labels(rule=rule.id)
            if rule.enforced and "steer" in rule.actions:
                self.steers.labels(rule=rule.id)

    # ------------------------------------------------------------------ observations
    def __call__(self, report: Report) -> None:
        """Record one finished call (the Monitor callback signature)."""
        self.requests.labels(outcome=report.outcome).inc()
        total_tokens = 0
        for scope, count in report.tokens_monitored.items():
            if count:
                self.tokens.labels(scope=scope).inc(count)
                total_tokens += count
        if total_tokens:
            self.overhead.observe(report.monitor_seconds / total_tokens)
        for hit in report.hits:
            for action in hit.actions or ("none",):
                self.rule_triggers.labels(rule=hit.rule_id, action=action, severity=hit.severity,
                                          mode=hit.mode).inc()
            if is_catalog_feature(hit.feature):
                self.feature_activation.labels(feature=hit.feature).observe(hit.activation)
        for info in report.blocks.values():
            self.blocks.labels(rule=info.rule_id).inc()
        for rule_id in {(d.row, d.rule_id) for d in report.steers}:
            self.steers.labels(rule=rule_id[1]).inc()
        if self._policy_version == "unknown" and report.policy_version:  # not attached
            self.set_build(policy_version=report.policy_version)

    def observe_reload(self, result: ReloadResult, store: Any = None) -> None:
        """Count one reload attempt; a successful one updates the build info's policy version
        and starts the new version's rule series at zero."""
        self.reloads.labels(result="success" if result.ok else "failure").inc()
        if result.ok:
            if store is not None:
                self.declare_rules(store.current)
            self.set_build(policy_version=result.version_id)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (what ``/metrics`` serves)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
