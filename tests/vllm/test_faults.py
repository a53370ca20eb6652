"""Bad input and faults on the vLLM path: each fails fast with one clear error, never hangs.

* an SAE whose width or layer does not fit the model: refused before the engine starts;
* a model vLLM cannot load: a ModelLoadError naming the model;
* the engine process killed mid-request: the request fails closed (EngineFailed), is counted,
  and every later request is refused at once with the reason.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest

from monitor.capture import HookPoint
from monitor.errors import ModelLoadError, SAEMismatchError
from monitor.runtime.vllm import EngineFailed, MonitorConfig
from monitor.runtime.vllm.engine import VLLMMonitor
from monitor import testing as builders
from tests.vllm.conftest import ENGINE_ARGS, MAX_MODEL_LEN

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("d_in, layer, problem", [(64, 15, "width 64"), (576, 40, "layer 40")])
def test_sae_that_does_not_fit_is_refused_before_the_engine_starts(tmp_path, model_dir, d_in, layer, problem):
    sae = builders.random_sae(d_in=d_in, d_sae=32, hook_name=HookPoint(layer).name)
    sae.save(tmp_path / "sae")
    started = time.perf_counter()
    with pytest.raises(SAEMismatchError, match=problem):
        VLLMMonitor(MonitorConfig(model=model_dir, sae=str(tmp_path / "sae")))
    assert time.perf_counter() - started < 30  # no engine was started


def test_model_vllm_cannot_load_names_the_model(tmp_path, model_dir):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source := Path(model_dir) / name).is_file():
            shutil.copy(source, broken / name)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config["architectures"] = ["NoSuchArchitectureForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="broken-model"):
        VLLMMonitor(MonitorConfig(model=str(broken), max_model_len=MAX_MODEL_LEN))


def _engine_core(pid: int) -> psutil.Process:
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "EngineCore" in child.name() or any("EngineCore" in part for part in child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise AssertionError("no EngineCore child process found")


def test_engine_killed_mid_request_fails_closed_is_counted_and_never_hangs(model_dir, policy_dir):
    import os

    monitor = VLLMMonitor(MonitorConfig(model=model_dir, policies=(str(policy_dir),), max_model_len=MAX_MODEL_LEN,
                                        dtype="float32", engine_args=dict(ENGINE_ARGS)))
    try:
        result: dict[str, BaseException | object] = {}

        def run() -> None:
            try:
                result["value"] = monitor.generate(["Tell me a long story about the sea."], max_tokens=200)
            except BaseException as exc:  # noqa: BLE001 - inspected below
                result["error"] = exc

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        time.sleep(3.0)  # the request is decoding
        assert worker.is_alive()
        _engine_core(os.getpid()).kill()
        worker.join(timeout=120)
        assert not worker.is_alive(), "the request hung after the engine died"
        assert isinstance(result.get("error"), EngineFailed), result
        assert "died" in str(result["error"]) or "failed" in str(result["error"])
        assert monitor.failures == 1
        started = time.perf_counter()
        with pytest.raises(EngineFailed, match="restart"):
            monitor.generate(["Hello"], max_tokens=4)
        assert time.perf_counter() - started < 5  # refused at once, no waiting on a dead engine
        assert monitor.failures == 2
    finally:
        monitor.close()
