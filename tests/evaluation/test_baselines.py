from __future__ import annotations

import pytest
import torch

from monitor.evaluation import baselines
from monitor.evaluation.items import scan_ids
from monitor.capture import HookPoint, capture
from monitor.policy import compile_policies, load_policies
from monitor.sae import SAE, SAEConfig
from monitor.stats import auroc
from monitor.runtime.hf import Monitor
from monitor.testing import tiny_model, tiny_tokenizer

LAYER = 2
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def quiet_monitor(tmp_path, tokenizer):
    sae = SAE(SAEConfig(architecture="relu", d_in=64, d_sae=16, hook_name=HookPoint(LAYER).name))
    path = tmp_path / "p.yaml"
    path.write_text("version: '1'\nrules:\n  - id: r\n    description: d\n    severity: low\n    mode: shadow\n"
                    "    when: {latent: 0, above: 1.0e9}\n    actions: [log]\n")
    policy = compile_policies(load_policies(path), None, d_sae=16)
    return Monitor(tiny_model("llama"), tokenizer, sae=sae, policies=policy, self_test=False)


def test_scan_ids_tokenises_like_monitor_scan(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    mon = quiet_monitor(tmp_path, tok)
    special = set(tok.all_special_ids)
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"}]
    for text, prompt in [("print(1)", "def f():\n"), ("just a response", None), (messages, None)]:
        ids, start = scan_ids(tok, text, prompt)
        report = mon.scan(text, prompt=prompt)
        response = [i for i in ids[start:] if i not in special]
        expected_response = len(response) if start else len(response) - (ids[0] not in special)
        assert report.tokens_monitored["response"] == expected_response
        assert report.tokens_monitored["prompt"] == len([i for i in ids[1:start] if i not in special])
    mon.close()


def test_pooled_residual_is_mean_and_max_over_the_scope():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = tok("context here, then the scoped part")["input_ids"]
    start = 5
    pooled = baselines.pooled_residual(model, tok, HookPoint(LAYER), ids, start)
    resid = capture(model, torch.tensor([ids]), HookPoint(LAYER))[0, start:]
    assert pooled.shape == (2 * 64,)
    torch.testing.assert_close(pooled, torch.cat([resid.mean(0), resid.amax(0)]))


def test_pooled_probe_separates_separable_data():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(20, generator=g)
    x = torch.randn(200, 20, generator=g)
    y = (x @ direction > 0).long()
    x = x + 0.5 * direction * (2 * y[:, None] - 1)  # a margin around the boundary
    probe = baselines.fit_pooled_probe(x[:150], y[:150])
    logits = probe.score(x[150:])
    assert float(auroc(logits, y[150:])) == 1.0
    assert torch.equal((logits > 0).long(), y[150:])
    with pytest.raises(ValueError, match="both labels"):
        baselines.fit_pooled_probe(x[:10], torch.ones(10))


UNSAFE = """\
import os
import subprocess


def run(user_input, cmd):
    os.system(user_input)
    subprocess.call(cmd, shell=True)
"""
CLEAN = """\
def add(a, b):
    return a + b
"""


def test_bandit_scores_unsafe_snippet_above_clean():
    pytest.importorskip("bandit")
    unsafe, clean, broken = baselines.bandit_findings([UNSAFE, CLEAN, "def broken(:\n"])
    assert broken is None and clean == []
    assert {f.test_id for f in unsafe} >= {"B605", "B602"}
    assert baselines.bandit_score(unsafe) > baselines.bandit_score(clean) == 0
    assert baselines.bandit_flags(unsafe) and not baselines.bandit_flags(clean)
    # Scoped to lines without the calls: only the LOW "import subprocess" finding remains.
    assert baselines.bandit_score(unsafe, lines=[1, 2, 5]) == 1.0
    assert not baselines.bandit_flags(unsafe, lines=[1, 2, 5])
    # Indented code (a method cut from a class) is dedented before parsing, lines unchanged.
    method = "    def go(self, x):\n        import os\n        os.system(x)\n"
    (found,) = baselines.bandit_findings([method])
    assert any(f.test_id == "B605" and f.line == 3 for f in found)
