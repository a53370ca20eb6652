"""Shared pieces of the backtest tests: a tiny chat model (Parts), policy files, conversations."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from monitor.backtest.run import Parts
from monitor.capture import capture
from monitor.data import token_ids
from monitor.testing import tied_sae, tiny_model, tiny_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LAYER = 2
DATA = Path(__file__).parent / "data" / "conversations.jsonl"
PID_DIR = Path(tempfile.gettempdir()) / "sae-monitor-backtest-test-workers"  # slow_tiny_parts' actors
AUTOCAST_DIR = Path(tempfile.gettempdir()) / "sae-monitor-backtest-test-autocast"  # autocast_tiny_parts' forwards


def tiny_parts() -> Parts:
    """A tiny llama (context 128) with a ChatML template and a tied SAE at layer 2. Importable
    by Ray workers (module-level), deterministic (seeded builders)."""
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return Parts(tiny_model("llama"), tok, tied_sae(LAYER), None)


def rule_yaml(rule_id: str, latent: int, above: float, *, scope: str = "response",
              actions: str = "[log, {block: {message: BLOCKED}}]", mode: str = "enforce") -> str:
    return (f"  - id: {rule_id}\n    description: test\n    severity: high\n    mode: {mode}\n"
            f"    scope: {scope}\n    when: {{latent: {latent}, above: {above}}}\n    actions: {actions}\n")


def write_policy(directory: Path, *rules: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "p.yaml").write_text("version: '1'\nrules:\n" + "".join(rules))
    return directory


def short_conversations(n: int = 24) -> list[dict]:
    """Short multi-turn chats that fit the tiny model's 128-token context."""
    words = ["ls -la", "rm -rf /", "hello", "sql", "eval(x)", "thanks", "why?", "ok", "password=1234", "sure"]
    out = []
    for i in range(n):
        turns = 1 + i % 3
        msgs = []
        for t in range(turns):
            msgs.append({"role": "user", "content": f"{words[(i + t) % 10]} {i}"})
            msgs.append({"role": "assistant", "content": f"{words[(i * 3 + t) % 10]} r{t}"})
        out.append({"id": f"c{i}", "messages": msgs})
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@torch.no_grad()
def quantile_threshold(parts: Parts, conversations: list, latent: int, q: float) -> float:
    """A threshold on ``latent`` that a fraction ``1 - q`` of the tokens of these conversations
    (lists of messages) exceed: a rule built to fire on some conversations and not others."""
    values = []
    for messages in conversations:
        ids = torch.tensor([token_ids(parts.tokenizer.apply_chat_template(list(messages), tokenize=True))])
        resid = capture(parts.model, ids, parts.sae.hook_point)
        values.append(parts.sae.encode(resid)[0, 1:, latent])
    return float(torch.quantile(torch.cat(values), q))


def slow_tiny_parts() -> Parts:
    """:func:`tiny_parts` whose forward takes 50 ms longer, so a test can kill a Ray worker
    while batches are still in flight."""
    import os
    import time

    PID_DIR.mkdir(parents=True, exist_ok=True)
    (PID_DIR / str(os.getpid())).touch()
    parts = tiny_parts()
    forward = parts.model.forward

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return forward(*args, **kwargs)

    parts.model.forward = slow
    return parts


def shadow_copy(policy_dir: Path, dest: Path) -> Path:
    """The policies of ``policy_dir`` (tests files left out) with every rule in shadow mode: they
    fire as before but never block. ``scan`` stops evaluating a request once it is blocked, the
    backtest reports every firing, so the per-turn reference of firings scans in shadow mode."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in Path(policy_dir).glob("*.yaml"):
        if not f.name.endswith(".tests.yaml"):
            (dest / f.name).write_text(f.read_text().replace("mode: enforce", "mode: shadow"))
    return dest


def per_turn_scans(mon, conv, shadow, max_tokens: int = 1 << 30) -> tuple[dict[str, tuple[int, str, int]], bool]:
    """What scanning every turn of ``conv`` as its own request with ``Monitor.scan`` finds: per
    rule the earliest firing as the backtest reports it, ``(turn, scope, token)``, from the
    ``shadow`` monitor (same policies in shadow mode, see :func:`shadow_copy`), and whether any
    turn's request was blocked, from ``mon``. The reference the backtest is checked against."""
    from monitor.backtest.replay import Replay, plan

    replay = plan(mon.tokenizer, conv, max_tokens)
    assert isinstance(replay, Replay)
    msgs = [dict(m) for m in conv.messages]
    requests = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    if msgs[-1]["role"] != "assistant":
        requests.append(len(msgs) - 1)
    first: dict[str, tuple[tuple[int, bool, int], str, int]] = {}
    blocked = False
    for k in requests:
        blocked |= bool(mon.scan(msgs[:k + 1]).blocks)
        report = shadow.scan(msgs[:k + 1])
        assert report.error is None and not report.blocks, report.error
        for hit in report.hits:  # within a turn, every prompt token precedes every response token
            turn = min(replay.turn_at(hit.token_index), k) if hit.scope == "prompt" else k
            key = (turn, hit.scope == "response", hit.token_index)
            if hit.rule_id not in first or key < first[hit.rule_id][0]:
                first[hit.rule_id] = (key, hit.scope, hit.token_index)
    return {rule: (key[0], scope, token) for rule, (key, scope, token) in first.items()}, blocked


def autocast_tiny_parts() -> Parts:
    """:func:`tiny_parts` whose forwards record, in a file per process under ``AUTOCAST_DIR``,
    the CPU autocast state they ran under (``off`` or its dtype): how a test sees what a Ray
    actor's forward ran in."""
    import os

    AUTOCAST_DIR.mkdir(parents=True, exist_ok=True)
    parts = tiny_parts()
    forward = parts.model.forward

    def recording(*args, **kwargs):
        state = str(torch.get_autocast_dtype("cpu")) if torch.is_autocast_enabled("cpu") else "off"
        with open(AUTOCAST_DIR / str(os.getpid()), "a") as f:
            f.write(state + "\n")
        return forward(*args, **kwargs)

    parts.model.forward = recording
    return parts
