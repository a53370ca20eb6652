from __future__ import annotations

import torch

from monitor.capture import HookPoint
from monitor.sae import SAE, fvu
from monitor.train import (TrainConfig, evaluate_reconstruction, extract_activations,
                           load_activations, tokenize_windows, train_sae)
from monitor.testing import tiny_model

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3,
         "def add(a, b):\n    return a + b\n" * 4,
         "User: hello there\nAssistant: Hi! How can I help you today?" * 2] * 6


def test_end_to_end_tiny_training(tmp_path, tiny_tokenizer):
    model = tiny_model("llama")
    windows = tokenize_windows(TEXTS, tiny_tokenizer, ctx=32)
    assert all(len(w) <= 32 for w in windows)
    shards = []
    extract_activations(model, windows, [HookPoint(1), HookPoint(2)], tmp_path / "acts",
                        batch_size=4, progress=lambda done, total: shards.append((done, total)))
    assert shards and shards[-1][0] == shards[-1][1]
    acts = load_activations(tmp_path / "acts" / "L1_resid_post")
    assert acts.shape == (sum(len(w) - 1 for w in windows), 64) and acts.dtype == torch.float16

    # a second call finds the shards and does nothing (resumable)
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "acts").rglob("*.npy"))
    extract_activations(model, windows, [HookPoint(1), HookPoint(2)], tmp_path / "acts", progress=False)
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "acts").rglob("*.npy")) == before

    cfg = TrainConfig(d_sae=128, k=8, batch_tokens=64, lr=3e-3, warmup_steps=5, epochs=30,
                      dead_tokens=2000, checkpoint_every=50)
    logged, steps = [], []
    sae, summary = train_sae(acts, cfg, out=tmp_path / "run", log_every=1, on_log=logged.append,
                             progress=lambda done, total: steps.append((done, total)))
    history = summary["history"]
    assert logged == history and steps[-1] == (summary["steps"], summary["steps"])
    assert history[-1]["fvu"] < 0.5 * history[0]["fvu"], "training loss must fall"
    assert (tmp_path / "run" / "checkpoint.pt").exists()

    sae.save(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))

    # the reported FVU equals a hand computation on the raw activations
    metrics = evaluate_reconstruction(loaded, acts)
    x = acts.float()
    x_hat = loaded(x)
    by_hand = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert abs(metrics["fvu"] - by_hand) < 1e-4 and abs(fvu(x, x_hat) - by_hand) < 1e-6
    assert metrics["fvu"] < 0.5
    assert 1 <= metrics["l0"] <= 40


def test_training_resumes_from_checkpoint(tmp_path):
    acts = torch.randn(2048, 16).half()
    cfg = TrainConfig(d_sae=32, k=4, batch_tokens=128, epochs=1, checkpoint_every=4, warmup_steps=2)
    full, _ = train_sae(acts, cfg, out=tmp_path / "a", progress=False)
    # interrupted run: a config with fewer epochs stops early, then the full one resumes
    train_sae(acts, TrainConfig(**{**cfg.__dict__, "epochs": 0.5}), out=tmp_path / "b", progress=False)
    resumed, _ = train_sae(acts, cfg, out=tmp_path / "b", progress=False)
    assert resumed.W_enc.shape == full.W_enc.shape
    step = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"]
    assert step == 2048 // 128


def test_train_command_end_to_end(tmp_path, tiny_tokenizer):
    """`sae-monitor train` on a saved tiny model: extraction, training, SAELens output, card."""
    import json

    from monitor.cli import main

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    code = tmp_path / "snippet.py"
    code.write_text("def add(a, b):\n    return a + b\n" * 5)
    out = tmp_path / "run"
    status = main(["train", "--model", str(model_dir), "--data", str(data), str(code), "--layer", "1",
                   "--tokens", "2000", "--ctx", "32", "--d-sae", "64", "--k", "4", "--batch-tokens", "128",
                   "--epochs", "3", "--out", str(out)])
    assert status == 0
    sae = SAE.load(out / "sae")
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and sae.cfg.d_sae == 64
    assert sae.W_enc.dtype == torch.float16 or SAE.load(out / "sae", dtype=None).W_enc.dtype == torch.float16
    card = (out / "sae" / "README.md").read_text()
    assert "train_fvu" in card and "blocks.1.hook_resid_post" in card
