from __future__ import annotations

import pytest
import torch

from monitor import testing as builders


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_llama():
    return builders.tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return builders.tiny_tokenizer()


@pytest.fixture(scope="session")
def default_model():
    """The real embedded default model, loaded once for the whole run (end-to-end tests)."""
    from monitor.models import load_default_model

    return load_default_model()
