from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from monitor.capture import capture
from monitor.discover import discover, labeled_item
from monitor.explain import (Context, Histogram, LogitEffects, context_text, example_contexts,
                             format_context, format_contexts, format_logit_effects, logit_effects,
                             render_html, scan_latents, token_pieces, top_contexts)
from monitor.errors import SAEMismatchError
from monitor.testing import random_sae, tiny_model, tiny_tokenizer
from tests.test_discover import POINT, VALUE, dialogue_rows, planted_sae

TEXTS = ["the cat sat on a mat and then Z went home", "nothing here at all", "ab Z",
         "line one\nline two Z and more words after it"]


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    return model, tokenizer, planted_sae(model, tokenizer)


def _bruteforce(model, tokenizer, sae, latent, text):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        acts = sae.encode(capture(model, ids, POINT)[0])[:, latent].clone()
    acts[0] = 0.0                                            # position 0 never counts
    return ids[0].tolist(), acts


def test_top_contexts_planted_latent(setup):
    model, tokenizer, sae = setup
    contexts = top_contexts(model, tokenizer, sae, 3, TEXTS, n=10, window=4)
    assert [c.item for c in contexts] == [0, 2, 3]           # ties (all 5.0) by text order
    for c in contexts:
        assert c.tokens[c.peak] == "Z"
        assert c.value == pytest.approx(VALUE, abs=1e-4)
        assert sum(a > 0 for a in c.activations) == 1
        assert len(c.tokens) == len(c.activations) <= 9
        assert "".join(c.tokens) in TEXTS[c.item]
    assert contexts[1].truncated_right is False and contexts[0].truncated_left is True
    assert context_text(contexts[1]) == "ab «Z»"
    assert context_text(contexts[2]) == "…two «Z» and…"


def test_scan_matches_bruteforce_for_a_random_latent(setup):
    model, tokenizer, sae = setup
    latent = 9                                               # random weights: fires broadly
    scan = scan_latents(model, tokenizer, sae, [latent, 3], TEXTS, n=2, window=3, bins=8)
    peaks = []
    all_acts = []
    for i, text in enumerate(TEXTS):
        ids, acts = _bruteforce(model, tokenizer, sae, latent, text)
        all_acts.append(acts)
        peaks.append((float(acts.max()), i, int(acts.argmax()), ids, acts))
    peaks.sort(key=lambda p: (-p[0], p[1]))
    got = scan[latent].contexts
    assert [c.item for c in got] == [p[1] for p in peaks[:2]]
    for c, (value, _, pos, ids, acts) in zip(got, peaks):
        assert c.value == pytest.approx(value, abs=1e-5)
        s = max(0, pos - 3)
        assert c.start == s and c.peak == pos - s
        assert list(c.activations) == pytest.approx(acts[s:pos + 4].tolist(), abs=1e-5)
        assert "".join(c.tokens) == tokenizer.decode(ids[s:pos + 4])
    h = scan[latent].histogram
    flat = torch.cat(all_acts)
    assert h.n_tokens == sum(len(a) - 1 for a in all_acts)
    assert h.n_firing == int((flat > 0).sum()) and sum(h.counts) == h.n_firing
    assert h.edges[-1] == pytest.approx(float(flat.max()), abs=1e-5)
    assert scan[3].histogram.n_firing == 3 and scan[3].histogram.density == pytest.approx(3 / h.n_tokens)
    with pytest.raises(SAEMismatchError, match="out of range"):
        scan_latents(model, tokenizer, sae, [16], TEXTS)


def test_token_pieces_keep_text():
    tokenizer = tiny_tokenizer()
    text = "héllo wörld\n  ok"
    ids = tokenizer(text)["input_ids"]
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert "".join(token_pieces(tokenizer, ids[3:], previous=ids[2])) == tokenizer.decode(ids)[len(tokenizer.decode(ids[:3])):]


def test_terminal_rendering():
    c = Context(item=0, tokens=("a", " b", "\n", "Z", " c"), activations=(0.0, 1.0, 0.0, 4.0, 0.0),
                peak=3, start=5, truncated_left=True)
    plain = format_context(c, color=False)
    assert plain == "…a« b»↵«Z=4.00» c"
    colored = format_context(c, color=True)
    assert "\x1b[1;30;48;5;202mZ\x1b[0m" in colored and "\x1b[30;48;5;" in colored
    block = format_contexts([c], color=False, title="latent 3")
    assert block.splitlines()[0] == "latent 3" and "4.000" in block
    assert "never fired" in format_contexts([], color=False)
    effects = LogitEffects(latent=3, promoted=[(" cat", 1.5)], suppressed=[("\n", -0.5)])
    assert format_logit_effects(effects) == "promotes:   ' cat' +1.50\nsuppresses: '↵' -0.50\n"
    assert format_context(Context(0, ("\x03", "a"), (1.0, 0.0), 0, 0), color=False) == "«\\x03=1.00»a"


def test_logit_effects_reads_through_final_norm_and_unembedding(setup):
    model, tokenizer, _ = setup
    sae = random_sae("relu", d_in=64, d_sae=16, hook_name=POINT.name)
    target = tokenizer.convert_tokens_to_ids("Z")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
        unembed = model.get_output_embeddings().weight
        sae.W_dec[3] = unembed[target] / model.model.norm.weight
    try:
        effects = logit_effects(model, tokenizer, sae, 3, k=5)
        expected = (unembed @ (sae.W_dec[3] * model.model.norm.weight)).detach()[:len(tokenizer)]
        assert effects.promoted[0][0] == "Z"
        assert [v for _, v in effects.promoted] == pytest.approx(expected.topk(5).values.tolist(), rel=1e-5)
        assert [v for _, v in effects.suppressed] == pytest.approx((-(-expected).topk(5).values).tolist(), rel=1e-5)
        assert all(a >= b for (_, a), (_, b) in zip(effects.promoted, effects.promoted[1:]))
        assert not any("\ufffd" in t for t, _ in effects.promoted + effects.suppressed)
    finally:
        with torch.no_grad():
            model.model.norm.weight.fill_(1.0)
    with pytest.raises(SAEMismatchError):
        logit_effects(model, tokenizer, sae, 99)


def test_example_contexts_for_catalog_evidence(setup):
    model, tokenizer, sae = setup
    result = discover(model, tokenizer, sae, [labeled_item(r) for r in dialogue_rows()], top=3)
    examples = example_contexts(model, tokenizer, sae, result, [3, 7], k=2, window=3)
    assert len(examples[3]) == 2 and all("«Z»" in e for e in examples[3])
    assert examples[7] == []


def test_histogram_of():
    h = Histogram.of(torch.tensor([0.0, 0.0, 1.0, 2.0, 4.0]), n_tokens=10, bins=4)
    assert h.counts == (0, 1, 1, 1) and h.edges == (0.0, 1.0, 2.0, 3.0, 4.0)
    assert h.n_firing == 3 and h.density == 0.3
    empty = Histogram.of(torch.zeros(3), n_tokens=3)
    assert empty.n_firing == 0 and empty.density == 0.0


# ------------------------------------------------------------------ the HTML page, in a browser

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
