"""Fixtures for the vLLM adapter's tests: one real vLLM engine (the default model) per run.

These tests need vLLM (the ``sae-monitor[vllm]`` extra, installed into its own environment by
``tools/vllm-env.sh``). In an environment without vLLM only ``test_batch.py`` and
``test_missing.py`` are collected; ``make test`` runs this directory with the vLLM environment.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
collect_ignore_glob = [] if HAVE_VLLM else ["test_parity.py", "test_faults.py", "test_serve.py"]

# One small engine on a shared 2-core machine: little KV cache RAM, short sequences, and a
# token budget per step small enough that every prompt is prefilled in several chunks.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
ENGINE_ARGS = {"max_num_batched_tokens": 16, "max_num_seqs": 8}
MAX_MODEL_LEN = 256


@pytest.fixture(scope="session")
def model_dir() -> str:
    from monitor.models import default_model_cache_dir, load_default_model

    path = default_model_cache_dir()
    if not (path / "config.json").is_file():
        load_default_model()
    return str(path)


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory) -> Path:
    """A copy of the shipped policies the tests may rewrite (reload is tested on it)."""
    from monitor.shipped import shipped_policies_dir

    target = tmp_path_factory.mktemp("policies")
    for path in shipped_policies_dir().glob("*.yaml"):
        if not path.name.endswith(".tests.yaml"):
            shutil.copy(path, target / path.name)
    return target


@pytest.fixture(scope="session")
def vllm_monitor(model_dir, policy_dir):
    from monitor.runtime.vllm import MonitorConfig
    from monitor.runtime.vllm.engine import VLLMMonitor

    monitor = VLLMMonitor(MonitorConfig(model=model_dir, policies=(str(policy_dir),),
                                        max_model_len=MAX_MODEL_LEN, dtype="float32",
                                        engine_args=dict(ENGINE_ARGS)))
    yield monitor
    monitor.close()
