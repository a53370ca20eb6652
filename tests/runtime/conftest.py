from __future__ import annotations

import pytest
import torch

from monitor.testing import tiny_model

GEN = dict(max_new_tokens=8, do_sample=False)


@pytest.fixture
def setup(tiny_tokenizer):
    """A tiny llama, the byte tokenizer, a prompt and its greedy unmonitored continuation."""
    model = tiny_model("llama")
    prompt = torch.tensor([[5, 17, 42, 99, 7, 13]])
    with torch.no_grad():
        plain = model.generate(prompt, pad_token_id=tiny_tokenizer.pad_token_id, **GEN)
    return model, tiny_tokenizer, prompt, plain
