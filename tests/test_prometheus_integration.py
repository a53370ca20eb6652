"""The shipped Prometheus examples, checked by Prometheus's own tools, and a real Prometheus
server scraping a real sae-monitor server on loopback.

Needs Debian's ``prometheus`` package (``promtool`` and ``prometheus``); each test is skipped,
saying so, when its binary is absent.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from tests.test_serve import (
    EVERYWHERE_SHADOW,
    LONG,
    LONG_PROMPT_BLOCK,
    SHORT,
    make_monitor,
    wait_for,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed "
                                    "(apt-get install prometheus)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus server binary not "
                                      "installed (apt-get install prometheus)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)  # type: ignore[list-item]


@needs_promtool
def test_promtool_accepts_the_rules_and_the_config():
    rules = promtool("check", "rules", str(EXAMPLES / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = promtool("check", "config", str(EXAMPLES / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr


ALERT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  # Steady traffic, then from minute 100 a third of the requests are blocked.
  - interval: 1m
    input_series:
      - series: 'sae_monitor_requests_total{{job="sae-monitor",instance="a",outcome="allowed"}}'
        values: '0+60x130'
      - series: 'sae_monitor_requests_total{{job="sae-monitor",instance="a",outcome="blocked"}}'
        values: '0x100 30+30x30'
    promql_expr_test:
      - expr: ALERTS{{alertname="SaeMonitorBlockRateSpike"}}
        eval_time: 95m
        exp_samples: []
      - expr: ALERTS{{alertname="SaeMonitorBlockRateSpike"}}
        eval_time: 110m
        exp_samples:
          - labels: 'ALERTS{{alertname="SaeMonitorBlockRateSpike",alertstate="firing",job="sae-monitor",severity="warning"}}'
            value: 1
      - expr: ALERTS{{alertname="SaeMonitorErrorRate"}}
        eval_time: 110m
        exp_samples: []
  # 2 of 62 requests per minute fail: above 1%.
  - interval: 1m
    input_series:
      - series: 'sae_monitor_requests_total{{job="sae-monitor",instance="a",outcome="allowed"}}'
        values: '0+60x40'
      - series: 'sae_monitor_requests_total{{job="sae-monitor",instance="a",outcome="failed_open"}}'
        values: '0x20 2+2x20'
    promql_expr_test:
      - expr: ALERTS{{alertname="SaeMonitorErrorRate",alertstate="firing"}}
        eval_time: 35m
        exp_samples:
          - labels: 'ALERTS{{alertname="SaeMonitorErrorRate",alertstate="firing",job="sae-monitor",severity="critical"}}'
            value: 1
  # Per-token overhead mostly between 1 and 10 ms: p99 above 5 ms; and a rejected reload.
  - interval: 1m
    input_series:
      - series: 'sae_monitor_monitor_overhead_seconds_per_token_bucket{{job="sae-monitor",instance="a",le="0.001"}}'
        values: '0+10x40'
      - series: 'sae_monitor_monitor_overhead_seconds_per_token_bucket{{job="sae-monitor",instance="a",le="0.01"}}'
        values: '0+100x40'
      - series: 'sae_monitor_monitor_overhead_seconds_per_token_bucket{{job="sae-monitor",instance="a",le="+Inf"}}'
        values: '0+100x40'
      - series: 'sae_monitor_policy_reloads_total{{job="sae-monitor",instance="a",result="failure"}}'
        values: '0x20 1x20'
    promql_expr_test:
      - expr: ALERTS{{alertname="SaeMonitorOverheadP99",alertstate="firing"}}
        eval_time: 30m
        exp_samples:
          - labels: 'ALERTS{{alertname="SaeMonitorOverheadP99",alertstate="firing",job="sae-monitor",severity="warning"}}'
            value: 1
      - expr: ALERTS{{alertname="SaeMonitorPolicyReloadFailed",alertstate="firing"}}
        eval_time: 25m
        exp_samples:
          - labels: 'ALERTS{{alertname="SaeMonitorPolicyReloadFailed",alertstate="firing",instance="a",job="sae-monitor",result="failure",severity="warning"}}'
            value: 1
"""


@needs_promtool
def test_alerts_fire_on_synthetic_series(tmp_path):
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(ALERT_TESTS.format(rules=json.dumps(str(EXAMPLES / "alerts.yml"))))
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr


# ============================================================================ live Prometheus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class PrometheusProcess:
    """The real Prometheus server on loopback with a temporary config and data directory."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        config.write_text(textwrap.dedent(f"""
            global: {{scrape_interval: 1s, evaluation_interval: 1s}}
            rule_files: [{json.dumps(str(EXAMPLES / "alerts.yml"))}]
            scrape_configs:
              - job_name: sae-monitor
                static_configs: [{{targets: ["{target}"]}}]
        """))
        self.log = (tmp / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",  # type: ignore[list-item]
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.process.returncode}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def query(self, promql: str) -> dict:
        return get_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()


@dataclass(frozen=True)
class LiveStack:
    prometheus: PrometheusProcess
    finish_reasons: list


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveStack]:
    """A tiny-model ``sae-monitor serve`` that answered three requests (one blocked), scraped
    every second by the real Prometheus."""
    from openai import OpenAI

    from monitor.serve import ServerThread, create_app

    if PROMETHEUS is None:
        pytest.skip("prometheus server binary not installed (apt-get install prometheus)")
    tmp_path = tmp_path_factory.mktemp("live")
    monitor = make_monitor(tmp_path, LONG_PROMPT_BLOCK, EVERYWHERE_SHADOW)
    server = ServerThread(create_app(monitor, model_name="tiny")).start()
    prometheus = None
    try:
        prometheus = PrometheusProcess(tmp_path, f"127.0.0.1:{server.port}")
        assert wait_for(prometheus.ready, timeout=60, interval=0.2), "prometheus never became ready"

        def scraped() -> bool:   # a counter first seen at its final value has a rate of 0
            return bool(prometheus.query('up{job="sae-monitor"} == 1')["data"]["result"])

        assert wait_for(scraped, timeout=30, interval=0.2), "prometheus never scraped the server"
        client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        finishes = [client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": text}], max_tokens=4,
            temperature=0).choices[0].finish_reason for text in (SHORT, LONG, SHORT + "!")]

        def blocks_seen() -> bool:
            result = prometheus.query('sae_monitor_blocks_total{job="sae-monitor"}')["data"]["result"]
            return any(float(r["value"][1]) >= 1 for r in result)

        assert wait_for(blocks_seen, timeout=30, interval=0.5), \
            "sae_monitor_blocks_total never reached Prometheus"
        yield LiveStack(prometheus, finishes)
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()
        monitor.close()


def test_prometheus_scrapes_blocks_from_a_live_server(live):
    assert live.finish_reasons.count("content_filter") == 1
    (series,) = live.prometheus.query('sae_monitor_blocks_total{job="sae-monitor"}')["data"]["result"]
    assert series["metric"]["rule"] == "long_prompt.block" and float(series["value"][1]) == 1
    requests = live.prometheus.query('sum by (outcome) (sae_monitor_requests_total{job="sae-monitor"})')
    by_outcome = {r["metric"]["outcome"]: float(r["value"][1]) for r in requests["data"]["result"]}
    assert by_outcome["blocked"] == 1 and by_outcome["allowed"] == 2 and by_outcome["error"] == 0


def test_dashboard_queries_and_alert_rules_are_valid_for_prometheus(live):
    dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    for expr in exprs:
        promql = (expr.replace("$__rate_interval", "1m").replace("$__range", "5m")
                  .replace("$job", ".*"))
        answer = live.prometheus.query(promql)
        assert answer["status"] == "success", (expr, answer)
    rules = get_json(live.prometheus.url + "/api/v1/rules")["data"]["groups"]
    assert {g["name"] for g in rules} == {"sae-monitor.recording", "sae-monitor.alerts"}
    assert all(r["health"] != "err" for g in rules for r in g["rules"])


def _load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES.parent / "tools" / name)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  (dataclasses look the module up)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_dashboard_preview_draws_the_live_data(live, tmp_path):
    preview = _load_tool("dashboard_preview.py")
    dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    panels = {p.title: p for p in preview.collect(live.prometheus.url, dashboard, range_s=120, step_s=1)}
    assert not [p.errors for p in panels.values() if p.errors]
    outcomes = {s.name for s in panels["Requests per second by outcome"].series if s.points}
    assert {"allowed", "blocked"} <= outcomes
    assert [s.name for s in panels["Blocks per second by rule"].series] == ["long_prompt.block"]
    (ratio,) = panels["Block ratio"].series
    assert 0 < ratio.points[-1][1] <= 1
    (info,) = panels["Active policy version and SAE"].rows
    assert info["policy_version"] and info["sae"]
    assert not panels["Steering interventions per second by rule"].has_data   # no steer rule loaded
    page = tmp_path / "preview.html"
    page.write_text(preview.render_html(dashboard, list(panels.values())))
    text = page.read_text()
    assert all(title.replace("'", "&#x27;") in text for title in panels)
    assert text.count("<polyline") >= 3 and "No data" in text and "long_prompt.block" in text
    if preview.chromium() is not None:
        png = tmp_path / "preview.png"
        preview.screenshot(page, png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
