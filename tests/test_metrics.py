"""Prometheus metrics: names and types, what each report increments, bounded labels only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from monitor import __version__
from monitor.metrics import MonitorMetrics, is_catalog_feature, sae_identity
from monitor.report import OUTCOMES
from monitor.policy import Hit, ReloadResult, SteerDirective
from monitor.report import BlockInfo, Report
from tests.test_serve import (
    CANARY,
    CATALOG,
    EVERYWHERE_SHADOW,
    LONG,
    LONG_PROMPT_BLOCK,
    RAW_LATENT_SHADOW,
    STEER_FIRST,
    make_monitor,
    make_sae,
    policies_yaml,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# The public contract dashboards and alerts are written against (name -> type).
FAMILIES = {
    "sae_monitor_requests": "counter",
    "sae_monitor_tokens_monitored": "counter",
    "sae_monitor_rule_triggers": "counter",
    "sae_monitor_blocks": "counter",
    "sae_monitor_steering_interventions": "counter",
    "sae_monitor_feature_activation": "histogram",
    "sae_monitor_monitor_overhead_seconds_per_token": "histogram",
    "sae_monitor_policy_reloads": "counter",
    "sae_monitor_build": "info",
}


def hit(rule="r1", row=0, token=3, scope="response", mode="enforce", severity="high",
        actions=("log", "block"), feature="test.everywhere", activation=2.5) -> Hit:
    return Hit(rule, row, token, scope, mode, severity, actions, feature, activation)


def sample(metrics: MonitorMetrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def metrics() -> MonitorMetrics:
    return MonitorMetrics(CollectorRegistry())


def test_families_names_and_types(metrics):
    assert {f.name: f.type for f in metrics.registry.collect()} == FAMILIES
    for outcome in OUTCOMES:  # known label values are exported at zero from the start
        assert metrics.registry.get_sample_value("sae_monitor_requests_total", {"outcome": outcome}) == 0.0
    assert sample(metrics, "sae_monitor_policy_reloads_total", result="failure") == 0.0


def test_a_report_increments_each_instrument(metrics):
    report = Report(request_id="req-1", policy_version="v1",
                    hits=[hit(), hit(token=4, feature="latent:7", activation=9.0),
                          hit(rule="s1", row=1, actions=("steer",), severity="medium"),
                          hit(rule="sh", mode="shadow", actions=("alert",), severity="info",
                              feature="test.other", activation=0.3)],
                    blocks={0: BlockInfo(0, "r1", "no", "response", 3)},
                    steers=[SteerDirective(1, "s1", 5, None, "clamp", 0.0, "rest_of_response", 3, "response"),
                            SteerDirective(1, "s1", 6, None, "clamp", 0.0, "rest_of_response", 3, "response")],
                    row_outcomes=["blocked", "steered"],
                    tokens_monitored={"prompt": 10, "response": 6}, monitor_seconds=0.016)
    metrics(report)
    assert sample(metrics, "sae_monitor_requests_total", outcome="blocked") == 1
    assert sample(metrics, "sae_monitor_requests_total", outcome="error") == 0
    assert sample(metrics, "sae_monitor_tokens_monitored_total", scope="prompt") == 10
    assert sample(metrics, "sae_monitor_tokens_monitored_total", scope="response") == 6
    assert sample(metrics, "sae_monitor_rule_triggers_total", rule="r1", action="block",
                  severity="high", mode="enforce") == 2
    assert sample(metrics, "sae_monitor_rule_triggers_total", rule="r1", action="log",
                  severity="high", mode="enforce") == 2
    assert sample(metrics, "sae_monitor_rule_triggers_total", rule="sh", action="alert",
                  severity="info", mode="shadow") == 1
    assert sample(metrics, "sae_monitor_blocks_total", rule="r1") == 1
    assert sample(metrics, "sae_monitor_steering_interventions_total", rule="s1") == 1  # one row
    # Catalog names are observed, raw latents are not.
    assert sample(metrics, "sae_monitor_feature_activation_count", feature="test.everywhere") == 2
    assert sample(metrics, "sae_monitor_feature_activation_sum", feature="test.everywhere") == 5.0
    assert sample(metrics, "sae_monitor_feature_activation_count", feature="test.other") == 1
    assert "latent:7" not in metrics.exposition().decode()
    assert sample(metrics, "sae_monitor_monitor_overhead_seconds_per_token_count") == 1
    assert sample(metrics, "sae_monitor_monitor_overhead_seconds_per_token_sum") == pytest.approx(0.001)
    assert sample(metrics, "sae_monitor_build_info", version=__version__,
                  policy_version="v1", sae="unknown") == 1


@pytest.mark.parametrize("kwargs, outcome", [
    (dict(), "allowed"),
    (dict(error="RuntimeError: x"), "error"),
    (dict(error="RuntimeError: x", failed_open=True), "failed_open"),
    (dict(steers=[SteerDirective(0, "s", 1, None, "scale", 0.5, "while_active", 0, "response")]), "steered"),
    (dict(blocks={0: BlockInfo(0, "b", "m", "prompt", 2)}), "blocked"),
])
def test_outcomes(metrics, kwargs, outcome):
    metrics(Report(request_id="r", policy_version="v", **kwargs))
    assert {o: sample(metrics, "sae_monitor_requests_total", outcome=o) for o in OUTCOMES} == \
        {o: float(o == outcome) for o in OUTCOMES}
    assert sample(metrics, "sae_monitor_monitor_overhead_seconds_per_token_count") == 0  # no tokens


def test_reloads_and_build_info(metrics, tmp_path):
    monitor = make_monitor(tmp_path, EVERYWHERE_SHADOW)
    metrics.attach(monitor)
    metrics.attach(monitor)  # idempotent
    assert monitor.callbacks.count(metrics) == 1
    version = monitor.policy.version_id
    assert sample(metrics, "sae_monitor_build_info", version=__version__,
                  policy_version=version, sae="tiny-test-sae") == 1
    monitor.reload_policies()
    assert sample(metrics, "sae_monitor_policy_reloads_total", result="success") == 1  # once
    metrics.observe_reload(ReloadResult(False, "bad file", version, False))
    assert sample(metrics, "sae_monitor_policy_reloads_total", result="failure") == 1
    metrics.observe_reload(ReloadResult(True, None, "v2", True))
    text = metrics.exposition().decode()
    assert 'policy_version="v2"' in text and f'policy_version="{version}"' not in text
    monitor.close()



def test_every_rule_starts_at_zero_so_its_first_event_is_a_rate(metrics, tmp_path):
    monitor = make_monitor(tmp_path, LONG_PROMPT_BLOCK, EVERYWHERE_SHADOW)
    metrics.attach(monitor)
    assert metrics.registry.get_sample_value("sae_monitor_blocks_total", {"rule": "long_prompt.block"}) == 0.0
    assert metrics.registry.get_sample_value("sae_monitor_rule_triggers_total", {
        "rule": "everywhere.shadow", "action": "metric", "severity": "info", "mode": "shadow"}) == 0.0
    assert metrics.registry.get_sample_value("sae_monitor_blocks_total", {"rule": "everywhere.shadow"}) is None
    assert metrics.registry.get_sample_value("sae_monitor_feature_activation_count",
                                             {"feature": "test.everywhere"}) == 0.0
    assert metrics.registry.get_sample_value("sae_monitor_steering_interventions_total",
                                             {"rule": "latent1.steer"}) is None
    (tmp_path / "policies" / "p.yaml").write_text(policies_yaml(EVERYWHERE_SHADOW, STEER_FIRST))
    assert monitor.reload_policies().ok
    assert metrics.registry.get_sample_value("sae_monitor_steering_interventions_total",
                                             {"rule": "latent1.steer"}) == 0.0
    monitor.close()

def test_default_registry_when_none():
    metrics = MonitorMetrics()
    try:
        assert metrics.registry is REGISTRY
        assert REGISTRY.get_sample_value("sae_monitor_requests_total", {"outcome": "allowed"}) == 0
        with pytest.raises(ValueError, match="Duplicated"):
            MonitorMetrics()
    finally:
        for instrument in (metrics.requests, metrics.tokens, metrics.rule_triggers, metrics.blocks,
                           metrics.steers, metrics.feature_activation, metrics.overhead,
                           metrics.reloads, metrics.build):
            REGISTRY.unregister(instrument)


def test_sae_identity():
    sae = make_sae()
    assert sae_identity(sae, CATALOG) == "tiny-test-sae"
    assert sae_identity(sae) == "relu-16@" + sae.cfg.hook_name
    sae.cfg.metadata["id"] = "my-sae"
    assert sae_identity(sae) == "my-sae"
    assert not is_catalog_feature("latent:12") and is_catalog_feature("a.b")


def test_labels_never_carry_text_or_request_ids(tmp_path):
    """A real monitored request with a distinctive prompt: the exposition holds no trace of it,
    and every label value comes from a bounded vocabulary."""
    registry = CollectorRegistry()
    metrics = MonitorMetrics(registry)
    monitor = make_monitor(tmp_path, LONG_PROMPT_BLOCK, EVERYWHERE_SHADOW, STEER_FIRST,
                           RAW_LATENT_SHADOW)
    metrics.attach(monitor)
    reports = []
    monitor.callbacks.append(reports.append)
    for prompt in (f"{CANARY} hi", f"{CANARY} {LONG}"):
        ids = torch.tensor([monitor.tokenizer(prompt)["input_ids"]])
        monitor.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=monitor.tokenizer.pad_token_id)
    assert {r.outcome for r in reports} == {"steered", "blocked"}
    text = metrics.exposition().decode()
    assert CANARY not in text
    for report in reports:
        assert report.request_id not in text
    rule_ids = {r.id for r in monitor.policy.rules}
    allowed = {
        "outcome": set(OUTCOMES), "scope": {"prompt", "response"}, "rule": rule_ids,
        "action": {"log", "metric", "alert", "block", "steer", "none"},
        "severity": {"info", "low", "medium", "high", "critical"}, "mode": {"enforce", "shadow"},
        "feature": {f.name for f in CATALOG.features}, "result": {"success", "failure"},
        "le": None, "version": None, "policy_version": {monitor.policy.version_id},
        "sae": {"tiny-test-sae"},
    }
    seen_features = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            for label, value in s.labels.items():
                assert label in allowed, f"unexpected label {label} on {s.name}"
                if allowed[label] is not None:
                    assert value in allowed[label], f"{s.name}{{{label}={value!r}}}"
                if label == "feature":
                    seen_features.add(value)
    assert seen_features == {"test.everywhere"}  # latent:1 and latent:3 rules were not observed
    assert sample(metrics, "sae_monitor_blocks_total", rule="long_prompt.block") == 1
    assert sample(metrics, "sae_monitor_steering_interventions_total", rule="latent1.steer") == 1
    monitor.close()


# ============================================================================ shipped examples


def _exprs_in_dashboard(dashboard: dict) -> list[str]:
    out = []
    for panel in dashboard["panels"]:
        out += [t["expr"] for t in panel.get("targets", []) if "expr" in t]
        for inner in panel.get("panels", []):
            out += [t["expr"] for t in inner.get("targets", []) if "expr" in t]
    return out


def _exported_names(metrics: MonitorMetrics) -> set[str]:
    """Every sample name the registry can expose, labelled series or not."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",)}
    return {family.name + suffix for family in metrics.registry.collect()
            for suffix in suffixes.get(family.type, ("",))}


def test_examples_reference_only_exported_metrics(metrics):
    exported = _exported_names(metrics)
    rules = yaml.safe_load((EXAMPLES / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    exprs += _exprs_in_dashboard(dashboard)
    assert len(exprs) > 10
    for expr in exprs:
        for name in re.findall(r"[a-z_:]*sae_monitor[a-z0-9_:]*", expr):
            known = recorded if ":" in name else exported
            assert name in known, f"{name} in {expr!r} is neither exported nor recorded"
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"SaeMonitorBlockRateSpike", "SaeMonitorErrorRate", "SaeMonitorOverheadP99"} <= alerts
    scrape = yaml.safe_load((EXAMPLES / "prometheus.yml").read_text())
    assert any(job["job_name"] == "sae-monitor" for job in scrape["scrape_configs"])
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for word in ("request", "block", "feature", "overhead", "reload"):
        assert word in titles
