from __future__ import annotations

import pytest
import torch

from monitor.capture import capture
from monitor.discover import discover, labeled_item
from monitor.explain import (Context, Histogram, LogitEffects, context_text, example_contexts,
                             format_context, format_contexts, format_logit_effects, logit_effects,
                             scan_latents, token_pieces, top_contexts)
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


def test_render_html_keeps_its_old_import_path():
    import monitor.explain as explain
    from monitor.explain_html import render_html

    assert explain.render_html is render_html
