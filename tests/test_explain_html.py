"""The explain page (monitor.explain_html): self-contained, and rendered by a real browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from monitor.explain import Context, Histogram, LogitEffects
from monitor.explain_html import render_html

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
                 if p and os.path.exists(p)), None)


def demo_page(tmp_path: Path) -> tuple[Path, list[Context]]:
    """A page for a realistic fake latent: shell commands built from user input."""
    snippets = [
        ("    cmd = \"rm -rf \" + user_path\n    os.system(cmd)\n", {"os": 1.2, ".system": 6.8, "(cmd": 3.1}),
        ("def run(host):\n    subprocess.call(\"ping \" + host, shell=True)\n",
         {"subprocess": 1.0, ".call": 4.9, "shell": 2.2, "=True": 5.6}),
        ("    os.popen(f\"cat {filename}\").read()\n", {"os": 0.6, ".popen": 5.9, "(f": 1.4}),
        ("print(\"<script>alert('x')</script>\")  # not a shell & more\n", {"print": 0.3}),
    ]
    contexts = []
    for i, (text, hot) in enumerate(snippets):
        tokens = re.findall(r"\.?\w+|\(\w+|=\w+|\s+|[^\w\s]", text)
        acts = tuple(hot.get(t, 0.0) for t in tokens)
        contexts.append(Context(item=i, tokens=tuple(tokens), activations=acts,
                                peak=max(range(len(acts)), key=acts.__getitem__), start=0,
                                truncated_right=i == 0))
    contexts.sort(key=lambda c: -c.value)
    values = torch.cat([torch.rand(400) ** 3 * 7, torch.zeros(20000)])
    effects = LogitEffects(latent=4711,
                           promoted=[(" system", 2.41), ("popen", 2.02), (" subprocess", 1.77), (" shell", 1.52),
                                     ("exec", 1.33), (" cmd", 1.01), ("\n", 0.72)],
                           suppressed=[(" safely", -1.63), (" escape", -1.40), (" quote", -1.12),
                                       (" sanitize", -0.93), (" <", -0.50), ("&", -0.31), (" the", -0.12)])
    out = render_html(4711, contexts, Histogram.of(values, n_tokens=len(values)), effects,
                      tmp_path / "latent.html", name="unsafe_code.shell_injection",
                      description="Shell commands built from user input",
                      stats={"AUROC (sven, held-out)": 0.812, "pair win": 0.74})
    return out, contexts


def test_html_page_is_self_contained(tmp_path):
    out, contexts = demo_page(tmp_path)
    page = out.read_text()
    assert "<script" not in page.replace("&lt;script&gt;", "")
    assert not re.search(r"(src|href)=\"?(https?:)?//", page)
    assert "<svg" in page and "&lt;script&gt;alert" in page
    assert page.count('class="ex"') == len(contexts)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_html_page_renders_in_headless_chromium(tmp_path):
    out, contexts = demo_page(tmp_path)
    shot = tmp_path / "latent.png"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600"]
    dom = subprocess.run(base + ["--dump-dom", out.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "unsafe_code.shell_injection" in dom
    assert dom.count('class="ex"') == 4 and "<svg" in dom and dom.count('class="bar"') > 5
    for token in (".system", ".popen", "=True"):
        assert re.search(rf'class="t pk"[^>]*>{re.escape(token)}</span>', dom)
    assert "&lt;script&gt;alert" in dom                     # example text escaped, not executed
    assert "popen" in dom and "safely" in dom                # logit tables
    subprocess.run(base + [f"--screenshot={shot}", out.resolve().as_uri()], capture_output=True,
                   timeout=120, check=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("SAE_MONITOR_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["SAE_MONITOR_KEEP_SCREENSHOT"])
