"""The command (exit codes, table, JSON) and the HTML report, drawn by real headless Chromium."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

from monitor.cli.drift import add_parser, cmd_drift
from monitor.drift.render import render_html, table

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
                 if p and os.path.exists(p)), None)
INCREASED_RED = (0xD3, 0x2F, 0x2F)   # the candidate bar of a rule whose rate increased


PAIRS = Path(__file__).resolve().parents[2] / "datasets" / "unsafe_code_pairs.jsonl"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(argv)


def command(world, candidates, *extra: str) -> tuple[int, str, str]:
    argv = ["drift", "--base", str(world["base"]), "--sae", str(world["sae"]), "--catalog", str(world["catalog"]),
            "--policies", str(world["policy"]), "--prompts", str(world["prompts"]), "--texts", str(world["texts"]),
            "--max-new-tokens", "6", "--batch-size", "6", "--threads", "1", "--quiet", *extra]
    for c in candidates:
        argv += ["--candidate", str(c)]
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        code = cmd_drift(parse(argv), out, err)
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    from tests.drift.test_direction import write_pairs

    out = tmp_path_factory.mktemp("reports")
    same = command(world, [world["same"]], "--html", str(out / "same.html"))
    series = command(world, [world["same"], world["pushed"]], "--json", "--html", str(out / "series.html"),
                     "--direction", str(PAIRS), "--preference", str(write_pairs(out / "shell.jsonl")))
    return {"same": same, "series": series, "dir": out}


def test_unchanged_candidate_exits_zero_with_a_table(runs):
    code, out, _ = runs["same"]
    assert code == 0
    assert "pushed.fires" in out and "unchanged" in out and "▲" not in out
    assert "exit code: 0" in out
    assert "concept directions" not in out and "pair preference" not in out   # none unless asked for


def test_directions_can_be_chosen_or_switched_off(world, tmp_path):
    from tests.drift.test_direction import write_pairs

    pairs = write_pairs(tmp_path / "mine.jsonl")
    code, out, _ = command(world, [world["same"]], "--json", "--direction", str(pairs), "--passes", "greedy")
    assert code == 0 and [d["name"] for d in json.loads(out)["candidates"][0]["directions"]] == ["mine"]
    code, out, _ = command(world, [world["same"]], "--json", "--passes", "greedy")
    assert json.loads(out)["candidates"][0]["directions"] == []


def test_increased_enforce_rule_exits_one_and_json_has_the_fields(runs):
    code, out, _ = runs["series"]
    assert code == 1
    data = json.loads(out)
    pushed = data["candidates"][1]
    rule = next(r for r in pushed["rules"] if r["id"] == "pushed.fires")
    assert rule["verdict"] == "increased" and rule["ci_low"] > 0
    assert pushed["enforce_increased"] == ["pushed.fires"]
    assert {"features", "latents_up", "latents_down", "fvu", "kl", "directions"} <= set(pushed)
    same, moved = (c["preferences"][0] for c in data["candidates"])
    assert same["name"] == "shell" and same["pairs"] == 10 and same["delta"] == 0.0 and same["verdict"] == "unchanged"
    assert moved["delta"] != 0.0


def test_bad_passes_option_is_one_plain_error(world):
    from monitor.drift import DriftInputError

    with pytest.raises(DriftInputError, match="--passes"):
        command(world, [world["same"]], "--passes", "beam")


# ------------------------------------------------------------------ HTML in a browser

def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) into rows of raw pixel bytes."""
    data = path.read_bytes()
    pos, idat, width, height, channels = 8, b"", 0, 0, 4
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(idat), width * channels, [], bytearray(width * channels)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, channels, rows


def count_colour(path: Path, rgb: tuple[int, int, int], tol: int = 12) -> int:
    width, channels, rows = png_pixels(path)
    return sum(1 for row in rows for x in range(width)
               if all(abs(row[x * channels + k] - rgb[k]) <= tol for k in range(3)))


def chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    base = [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
            "--window-size=1200,6000", "--hide-scrollbars"]
    return subprocess.run(base + list(args) + [page.resolve().as_uri()], capture_output=True, text=True,
                          timeout=120, check=True)


def test_html_is_self_contained(runs):
    page = (runs["dir"] / "series.html").read_text()
    assert "<script" not in page and not any(s in page for s in ('src="http', 'href="http', "url(http"))
    assert page.count("<svg") >= 1 + 2 * 2      # the series chart, then rates and latents per candidate


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_html_report_renders_in_headless_chromium(runs, tmp_path):
    series = runs["dir"] / "series.html"
    dom = chromium(series, tmp_path, "--dump-dom").stdout
    assert 'class="series"' in dom and dom.count('class="rates"') == 2 and dom.count('class="latents"') == 2
    assert dom.count('class="bar-cand"') == 4 and 'class="ctx"' in dom      # contexts of moved latents
    assert "test.pushed" in dom and "Checkpoint series" in dom
    shots = {}
    for name in ("series", "same"):
        shot = tmp_path / f"{name}.png"
        chromium(runs["dir"] / f"{name}.html", tmp_path, f"--screenshot={shot}")
        shots[name] = count_colour(shot, INCREASED_RED)
    # the increased rule's bar is drawn in red; a run where nothing increased has no red at all
    assert shots["series"] > 200 and shots["same"] == 0
    assert "Concept directions" in dom and "Pair preference" in dom


def test_table_and_html_from_the_api(world, tmp_path):
    from monitor.drift import Options, drift

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = drift(world["base"], [world["same"]], prompts=world["prompts"], texts=world["texts"],
                       sae=world["sae"], catalog=world["catalog"], policies=world["policy"],
                       options=Options(max_new_tokens=4, passes=("greedy",), contexts=0))
    finally:
        torch.set_num_threads(threads)
    text = table(result)
    assert "drift score 0.00" in text and "Checkpoint series" not in render_html(result, tmp_path / "r.html").read_text()
