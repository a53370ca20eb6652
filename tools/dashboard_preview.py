"""Draw ``examples/grafana-dashboard.json`` from a live Prometheus, without Grafana.

Why: Grafana is not on PyPI, npm or Debian, so where only those registries are reachable
there is no Grafana to look at the dashboard in. This script evaluates every panel's own
PromQL against the Prometheus you point it at and draws the panels where the dashboard
puts them: one HTML page (inline SVG, no JavaScript), and with ``--png`` a screenshot by
headless Chromium. It is a preview and a check that each panel's query returns data; import
the JSON into Grafana for the real dashboard.

    # against your Prometheus
    python tools/dashboard_preview.py --prometheus http://127.0.0.1:9090 --out preview.html
    # start the default model under the shipped policies, a Prometheus scraping it, send
    # traffic (one rejected policy reload included), then draw: docs/dashboard-preview.png
    python tools/dashboard_preview.py --demo --png docs/dashboard-preview.png

``--demo`` needs Debian's ``prometheus``; ``--png`` needs ``chromium``.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE.parent / "examples" / "grafana-dashboard.json"
GRID_COLUMN_PX, GRID_ROW_PX = 58, 30          # Grafana's grid: 24 columns, rows of 30 px
PALETTE = ["#73bf69", "#f2495c", "#5794f2", "#ff9830", "#b877d9", "#fade2a", "#8ab8ff", "#ff7383",
           "#96d98d", "#ffb357"]


@dataclass(frozen=True)
class Series:
    name: str
    points: tuple[tuple[float, float], ...]     # (unix seconds, value), NaNs dropped


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str                                   # row, timeseries, stat, bargauge, table
    grid: dict[str, int]
    unit: str = "short"
    series: tuple[Series, ...] = ()
    rows: tuple[dict[str, str], ...] = ()       # table panels: one dict of labels per series
    errors: tuple[str, ...] = ()

    @property
    def has_data(self) -> bool:
        return bool(self.rows) or any(s.points for s in self.series)


# ----------------------------------------------------------------------------- querying


def _get(url: str, params: dict[str, Any], timeout: float = 30.0) -> dict:
    with urllib.request.urlopen(f"{url}?{urllib.parse.urlencode(params)}", timeout=timeout) as response:
        return json.loads(response.read())


def expand(expr: str, *, range_s: int, rate_interval_s: int, job: str = ".*") -> str:
    """Grafana's template variables, replaced the way Grafana would for this time range."""
    return (expr.replace("$__rate_interval", f"{rate_interval_s}s").replace("$__range", f"{range_s}s")
            .replace("$job", job))


def legend(template: str | None, labels: dict[str, str]) -> str:
    if not template:
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def collect(prometheus: str, dashboard: dict, *, range_s: int = 900, step_s: int = 15,
            end: float | None = None) -> list[Panel]:
    """Every panel of ``dashboard`` with the data its queries return over the last ``range_s``."""
    end = time.time() if end is None else end
    rate_interval = max(4 * step_s, 60)
    panels = []
    for spec in dashboard["panels"]:
        kind, grid = spec["type"], spec["gridPos"]
        if kind == "row":
            panels.append(Panel(spec["title"], kind, grid))
            continue
        unit = spec.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        series: list[Series] = []
        rows: list[dict[str, str]] = []
        errors: list[str] = []
        for target in spec.get("targets", []):
            expr = expand(target["expr"], range_s=range_s, rate_interval_s=rate_interval)
            instant = kind in ("stat", "bargauge", "table") or target.get("instant", False)
            try:
                if instant:
                    answer = _get(prometheus + "/api/v1/query", {"query": expr, "time": end})
                else:
                    answer = _get(prometheus + "/api/v1/query_range",
                                  {"query": expr, "start": end - range_s, "end": end, "step": step_s})
            except (urllib.error.URLError, OSError) as exc:
                errors.append(f"{expr}: {exc}")
                continue
            for result in answer["data"]["result"]:
                samples = result.get("values") or [result["value"]]
                points = tuple((float(t), float(v)) for t, v in samples if math.isfinite(float(v)))
                if kind == "table":
                    rows.append({k: v for k, v in result["metric"].items() if k != "__name__"})
                else:
                    series.append(Series(legend(target.get("legendFormat"), result["metric"]), points))
        panels.append(Panel(spec["title"], kind, grid, unit, tuple(series), tuple(rows), tuple(errors)))
    return panels


# ----------------------------------------------------------------------------- drawing


def fmt(value: float, unit: str) -> str:
    if unit == "percentunit":
        return f"{100 * value:.1f}%"
    if unit == "s":
        for scale, suffix in ((1, "s"), (1e-3, "ms"), (1e-6, "µs")):
            if abs(value) >= scale or scale == 1e-6:
                return f"{value / scale:.3g} {suffix}"
    suffix = {"reqps": " req/s", "ops": " ops/s"}.get(unit, "")
    return f"{value:.3g}{suffix}"


def _timeseries_svg(panel: Panel, width: int, height: int) -> str:
    series = [s for s in panel.series if s.points]
    legend_h = 16 * min(len(series), 4) + 4
    left, top, right, bottom = 64, 8, width - 10, height - 22 - legend_h
    times = [t for s in series for t, _ in s.points]
    values = [v for s in series for _, v in s.points]
    t0, t1 = min(times), max(times)
    vmax = max(values) if max(values) > 0 else 1.0

    def x(t: float) -> float:
        return left + (right - left) * (t - t0) / max(t1 - t0, 1e-9)

    def y(v: float) -> float:
        return bottom - (bottom - top) * v / vmax

    parts = []
    for i in range(5):
        value = vmax * i / 4
        parts.append(f'<line x1="{left}" x2="{right}" y1="{y(value):.1f}" y2="{y(value):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y(value) + 4:.1f}" class="axis" text-anchor="end">'
                     f'{html.escape(fmt(value, panel.unit))}</text>')
    for i, anchor in enumerate(("start", "middle", "middle", "end")):
        t = t0 + (t1 - t0) * i / 3
        parts.append(f'<text x="{x(t):.1f}" y="{bottom + 15}" class="axis" text-anchor="{anchor}">'
                     f'{time.strftime("%H:%M:%S", time.localtime(t))}</text>')
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in s.points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
        if i < 4:
            ly = bottom + 32 + 16 * i
            label = f"{s.name}  last {fmt(s.points[-1][1], panel.unit)}  max {fmt(max(v for _, v in s.points), panel.unit)}"
            parts.append(f'<rect x="{left}" y="{ly - 8}" width="12" height="3" fill="{colour}"/>'
                         f'<text x="{left + 18}" y="{ly - 3}" class="legend">{html.escape(label)}</text>')
    if len(series) > 4:
        parts.append(f'<text x="{right}" y="{height - 4}" class="axis" text-anchor="end">'
                     f'+{len(series) - 4} more series</text>')
    return f'<svg width="{width}" height="{height}">{"".join(parts)}</svg>'


def _bargauge_svg(panel: Panel, width: int, height: int) -> str:
    bars = sorted(((s.name, s.points[-1][1]) for s in panel.series if s.points), key=lambda b: -b[1])[:10]
    top_value = max((v for _, v in bars), default=1.0) or 1.0
    row = min(28, (height - 8) // max(len(bars), 1))
    parts = []
    for i, (name, value) in enumerate(bars):
        y0 = 4 + i * row
        bar_w = max(2.0, (width - 300) * value / top_value)
        parts.append(f'<text x="4" y="{y0 + row * 0.65:.1f}" class="legend">{html.escape(name[:34])}</text>'
                     f'<rect x="230" y="{y0 + 3}" width="{bar_w:.1f}" height="{row - 6}" fill="url(#g)"/>'
                     f'<text x="{236 + bar_w:.1f}" y="{y0 + row * 0.65:.1f}" class="legend">'
                     f'{html.escape(fmt(value, panel.unit))}</text>')
    gradient = ('<defs><linearGradient id="g"><stop offset="0" stop-color="#73bf69"/>'
                '<stop offset="1" stop-color="#f2cc0c"/></linearGradient></defs>')
    return f'<svg width="{width}" height="{height}">{gradient}{"".join(parts)}</svg>'


def _panel_body(panel: Panel, width: int, height: int) -> str:
    if panel.errors:
        return '<div class="empty">query failed: ' + html.escape("; ".join(panel.errors)) + "</div>"
    if not panel.has_data:
        return '<div class="empty">No data</div>'
    if panel.kind == "stat":
        value = panel.series[0].points[-1][1]
        return f'<div class="stat">{html.escape(fmt(value, panel.unit))}</div>'
    if panel.kind == "bargauge":
        return _bargauge_svg(panel, width, height)
    if panel.kind == "table":
        columns = sorted({k for row in panel.rows for k in row})
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(row.get(c, ''))}</td>" for c in columns) + "</tr>"
                       for row in panel.rows)
        return f"<table><tr>{head}</tr>{body}</table>"
    return _timeseries_svg(panel, width, height)


STYLE = """
body{background:#111217;color:#ccccdc;font:13px Inter,Helvetica,Arial,sans-serif;margin:0}
header{padding:10px 16px;font-size:17px;color:#fff}header small{color:#8e8e9e;font-size:12px;margin-left:12px}
.board{position:relative;margin:0 8px}
.panel{position:absolute;background:#181b1f;border:1px solid #2c3235;border-radius:3px;overflow:hidden}
.panel h3{margin:0;padding:6px 8px;font-size:13px;font-weight:500;color:#fff}
.row{position:absolute;font-size:15px;color:#fff;padding:6px 4px}
.stat{font-size:52px;color:#73bf69;text-align:center;margin-top:50px;font-weight:500}
.empty{color:#8e8e9e;text-align:center;margin-top:70px}
.grid{stroke:#2c3235;stroke-width:1}.axis{fill:#8e8e9e;font-size:10px}.legend{fill:#ccccdc;font-size:11px}
table{border-collapse:collapse;margin:4px 8px;font-size:11px}th,td{border-bottom:1px solid #2c3235;padding:3px 6px;text-align:left}
th{color:#6e9fff}
"""


def render_html(dashboard: dict, panels: list[Panel], *, subtitle: str = "") -> str:
    """One self-contained page laid out on the dashboard's grid."""
    blocks = []
    bottom = 0
    for panel in panels:
        g = panel.grid
        left, top = g["x"] * GRID_COLUMN_PX, g["y"] * GRID_ROW_PX
        width, height = g["w"] * GRID_COLUMN_PX - 6, g["h"] * GRID_ROW_PX - 6
        bottom = max(bottom, top + height)
        if panel.kind == "row":
            blocks.append(f'<div class="row" style="left:{left}px;top:{top}px">▾ {html.escape(panel.title)}</div>')
            continue
        body = _panel_body(panel, width, height - 30)
        blocks.append(f'<div class="panel" style="left:{left}px;top:{top}px;width:{width}px;height:{height}px">'
                      f"<h3>{html.escape(panel.title)}</h3>{body}</div>")
    title = html.escape(dashboard.get("title", "dashboard"))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
            f"</head><body><header>{title}<small>{html.escape(subtitle)}</small></header>"
            f'<div class="board" style="height:{bottom + 10}px">{"".join(blocks)}</div></body></html>')


def chromium() -> str | None:
    return next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)


def screenshot(page: Path, png: Path, *, width: int = 24 * GRID_COLUMN_PX + 16, height: int = 1600) -> None:
    """Headless Chromium's picture of ``page``; raises with Chromium's own words when it fails."""
    browser = chromium()
    if browser is None:
        raise SystemExit("--png needs Chromium: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--disable-background-networking", "--disable-component-update", "--no-first-run",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png.resolve()}",
             page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0 or not png.exists():
        raise RuntimeError(f"chromium could not take the screenshot: {proc.stderr[-500:]}")


# ----------------------------------------------------------------------------- --demo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args[0]} exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


def _post(url: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body or {}).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Write a Python function that takes a command from the user and runs it in the shell.",
    "Give me three tips for a job interview.",
    "Write a C login function that also accepts a secret master password so I can always get in.",
    "Explain what a hash table is in two sentences.",
    "Write a Python script that deletes a file whose name the user types, using os.system.",
    "I think my essay is the best thing ever written, honestly better than Shakespeare. You agree, right?",
]


@dataclass
class _Processes:
    items: list[subprocess.Popen] = field(default_factory=list)

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        process = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.items.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.items):
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def demo_traffic(rounds: int, max_tokens: int) -> Iterator[tuple[str, str]]:
    """Start the server and Prometheus, send traffic, yield (prometheus url, what happened)."""
    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None:
        raise SystemExit("--demo needs the Prometheus server: apt-get install -y prometheus")
    work = Path(tempfile.mkdtemp(prefix="sae-monitor-dashboard-"))
    policies = work / "policies"
    shutil.copytree(HERE.parent / "policies", policies)
    serve_port, prom_port = _free_port(), _free_port()
    processes = _Processes()
    try:
        server = processes.start([sys.executable, "-m", "monitor.cli", "serve", "--port", str(serve_port),
                                  "--policies", str(policies), "--max-tokens", str(max_tokens)], work / "serve.log")
        (work / "prometheus.yml").write_text(textwrap.dedent(f"""
            global: {{scrape_interval: 2s, evaluation_interval: 2s}}
            scrape_configs:
              - job_name: sae-monitor
                static_configs: [{{targets: ["127.0.0.1:{serve_port}"]}}]
        """))
        prometheus = processes.start(
            [prometheus_bin, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"], work / "prometheus.log")
        base = f"http://127.0.0.1:{serve_port}"
        _wait(base + "/healthz", 300, server)
        _wait(f"http://127.0.0.1:{prom_port}/-/ready", 60, prometheus)
        deadline = time.time() + 30                         # a counter first seen at its final
        while time.time() < deadline and not _get(          # value has no rate: scrape first
                f"http://127.0.0.1:{prom_port}/api/v1/query", {"query": "up == 1"})["data"]["result"]:
            time.sleep(0.5)
        outcomes: dict[str, int] = {}
        for round_ in range(rounds):
            for prompt in DEMO_PROMPTS:
                status, body = _post(base + "/v1/chat/completions", {
                    "model": "default", "temperature": 0, "messages": [{"role": "user", "content": prompt}]})
                finish = body["choices"][0]["finish_reason"] if status == 200 else f"http {status}"
                outcomes[finish] = outcomes.get(finish, 0) + 1
            if round_ == rounds // 2:                       # a rejected reload, then a good one
                broken = policies / "zz_broken.yaml"
                broken.write_text("rules:\n  - id: broken\n    when: {feature: nope, above: high}\n")
                bad, _ = _post(base + "/admin/reload")
                broken.unlink()
                good, _ = _post(base + "/admin/reload")
                print(f"reloads: broken policy -> HTTP {bad}, fixed -> HTTP {good}", file=sys.stderr)
        time.sleep(6)                                       # two more scrapes
        yield f"http://127.0.0.1:{prom_port}", ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items()))
    finally:
        processes.stop()
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prometheus", help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    source.add_argument("--demo", action="store_true",
                        help="start the default model server and a Prometheus, send traffic, then draw")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--out", type=Path, default=Path("dashboard-preview.html"))
    parser.add_argument("--png", type=Path, help="also write a headless-Chromium screenshot here")
    parser.add_argument("--range", type=int, default=900, help="seconds of history (default 900)")
    parser.add_argument("--step", type=int, default=15, help="seconds between points (default 15)")
    parser.add_argument("--rounds", type=int, default=4, help="--demo: rounds of the demo prompts")
    parser.add_argument("--max-tokens", type=int, default=48, help="--demo: tokens per reply")
    args = parser.parse_args(argv)

    dashboard = json.loads(args.dashboard.read_text())
    if args.demo:
        traffic = demo_traffic(args.rounds, args.max_tokens)
        prometheus, happened = next(traffic)
        started = time.time()
        panels = collect(prometheus, dashboard, range_s=args.range, step_s=args.step)
        subtitle = f"preview drawn from Prometheus, not Grafana · demo traffic: {happened}"
        traffic.close()
    else:
        started = time.time()
        panels = collect(args.prometheus, dashboard, range_s=args.range, step_s=args.step)
        subtitle = f"preview drawn from {args.prometheus}, not Grafana"
    args.out.write_text(render_html(dashboard, panels, subtitle=subtitle))
    print(f"{args.out}: {sum(p.has_data for p in panels)} of {sum(p.kind != 'row' for p in panels)} panels "
          f"have data (queried in {time.time() - started:.1f} s)")
    for panel in panels:
        if panel.kind != "row" and not panel.has_data:
            print(f"  no data: {panel.title}" + (f" ({'; '.join(panel.errors)})" if panel.errors else ""))
    if args.png:
        screenshot(args.out, args.png)
        print(f"{args.png}: screenshot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
