"""Resolving and checking the models of a drift check, then loading them.

First stage of a drift check. Everything a user can get wrong about the inputs is checked
here *before any model work* (no weights are read; configs, tokenizer files and safetensors
headers are): a missing or half-written checkpoint directory, a candidate whose architecture,
hidden size, depth or tokenizer differs from the base, a LoRA adapter made for another base
(its target modules or shapes do not exist in the base), an empty prompt file. Each problem is
one :class:`DriftInputError` naming the path and the mismatch.

A model is ``default`` (the embedded SmolLM2-135M-Instruct), a full Hugging Face checkpoint
directory (``config.json`` + weights + tokenizer), or a PEFT adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``) that is applied over the base.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from monitor.errors import MonitorError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# config fields that must agree between base and candidate for an SAE trained on one to read the other
SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


class DriftInputError(MonitorError):
    """A drift input (model directory, adapter, prompt or text file) is unusable."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model argument: what it is and where its files are.

    ``kind`` is ``full`` (a checkpoint directory; ``default`` resolves to the cached one) or
    ``adapter`` (a PEFT adapter, applied over the base at load time).
    """

    spec: str
    kind: Literal["full", "adapter"]
    path: Path
    config: dict[str, Any]

    @property
    def label(self) -> str:
        """Short name for tables: ``default`` or the directory name."""
        return "default" if self.spec == "default" else Path(self.spec).name or self.spec


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DriftInputError(f"{path.parent}: no {path.name}; {what}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DriftInputError(f"{path}: unreadable or half-written JSON ({exc}); re-save the checkpoint") from None
    if not isinstance(data, dict):
        raise DriftInputError(f"{path}: expected a JSON object")
    return data


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, checking that the file holds every byte the
    header promises (a truncated, half-written file fails here, without reading weights)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(f"header of {n} bytes but the file has {size} bytes")
            header = json.loads(handle.read(n))
    except (OSError, ValueError) as exc:
        raise DriftInputError(f"{path}: not a complete safetensors file ({exc}); the checkpoint looks "
                              "half-written: wait for the writer to finish or re-save it") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise DriftInputError(f"{path}: truncated: the header promises {8 + n + end} bytes, the file has "
                              f"{size}; the checkpoint looks half-written: wait for the writer or re-save it")
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _check_weights(path: Path) -> None:
    for name in SHARD_INDEX:
        index = path / name
        if index.is_file():
            shards = sorted(set(_read_json(index, "").get("weight_map", {}).values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise DriftInputError(f"{path}: half-written checkpoint: {name} lists shard(s) "
                                      f"{', '.join(missing)} that do not exist")
            for shard in shards:
                if shard.endswith(".safetensors"):
                    safetensors_shapes(path / shard)
            return
    for name in MODEL_WEIGHTS:
        if (path / name).is_file():
            if name.endswith(".safetensors"):
                safetensors_shapes(path / name)
            return
    raise DriftInputError(f"{path}: half-written or incomplete checkpoint: config.json but no weights "
                          f"({' or '.join(MODEL_WEIGHTS)}, or a shard index)")


def resolve(spec: str | Path) -> ModelSource:
    """Resolve a model argument and check that its directory is complete (no weights read)."""
    spec = str(spec)
    if spec == "default":
        from monitor.models import default_model_cache_dir, load_default_model

        path = default_model_cache_dir()
        if not (path / "config.json").is_file():
            load_default_model()  # first use: convert the shipped GGUF into the cache once
        return ModelSource(spec, "full", path, _read_json(path / "config.json", ""))
    path = Path(spec).expanduser()
    if not path.exists():
        raise DriftInputError(f"{path}: no such model directory; pass 'default', a checkpoint directory "
                              "(save_pretrained) or a PEFT adapter directory")
    if not path.is_dir():
        raise DriftInputError(f"{path}: a model must be a directory (checkpoint or PEFT adapter), not a file")
    if (path / ADAPTER_CONFIG).is_file():
        config = _read_json(path / ADAPTER_CONFIG, "")
        weights = next((path / w for w in ADAPTER_WEIGHTS if (path / w).is_file()), None)
        if weights is None:
            raise DriftInputError(f"{path}: half-written adapter: {ADAPTER_CONFIG} but no "
                                  f"{' or '.join(ADAPTER_WEIGHTS)}")
        if weights.suffix == ".safetensors":
            safetensors_shapes(weights)
        return ModelSource(spec, "adapter", path, config)
    if not (path / "config.json").is_file():
        raise DriftInputError(f"{path}: neither a checkpoint (no config.json) nor a PEFT adapter "
                              f"(no {ADAPTER_CONFIG}); the directory is empty or half-written")
    config = _read_json(path / "config.json", "")
    _check_weights(path)
    if not any((path / t).is_file() for t in TOKENIZER_FILES):
        raise DriftInputError(f"{path}: checkpoint has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                              "save the tokenizer beside the model (tokenizer.save_pretrained)")
    return ModelSource(spec, "full", path, config)


def _vocab(path: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return tok.get_vocab(), tuple(sorted(str(t) for t in tok.all_special_tokens))


def check_compatible(base: ModelSource, candidate: ModelSource) -> None:
    """Refuse a candidate the base's SAE cannot be compared on: a different architecture,
    hidden size, depth or vocabulary, a different tokenizer, or an adapter for another base."""
    if candidate.kind == "adapter":
        check_adapter(base, candidate)
        return
    for key in SHAPE_FIELDS:
        b, c = base.config.get(key), candidate.config.get(key)
        if b != c:
            raise DriftInputError(f"{candidate.path}: {key} is {c!r} but the base ({base.spec}) has {b!r}; "
                                  "a drift check compares fine-tunes of the same base model")
    if _vocab(base.path) != _vocab(candidate.path):
        raise DriftInputError(f"{candidate.path}: its tokenizer differs from the base's ({base.spec}): "
                              "different vocabulary or special tokens; the same text would become "
                              "different tokens, so the two models cannot be compared token by token")


def _meta_model(config: dict[str, Any]) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def check_adapter(base: ModelSource, adapter: ModelSource) -> None:
    """An adapter fits the base when every module it adapts exists in the base with the
    adapter's input and output widths. Checked on a weightless (meta-device) copy of the base."""
    from torch import nn

    named = adapter.config.get("base_model_name_or_path") or "an unnamed base"
    if adapter.config.get("peft_type", "LORA") != "LORA":
        raise DriftInputError(f"{adapter.path}: peft_type {adapter.config.get('peft_type')!r} is not supported; "
                              "drift applies LoRA adapters")
    claimed = Path(str(named))
    if claimed.is_dir() and (claimed / "config.json").is_file():
        other = _read_json(claimed / "config.json", "")
        for key in SHAPE_FIELDS:
            if other.get(key) != base.config.get(key):
                raise DriftInputError(f"{adapter.path}: this adapter was made for {named}, whose {key} is "
                                      f"{other.get(key)!r}; the base ({base.spec}) has {base.config.get(key)!r}")
    weights = adapter.path / ADAPTER_WEIGHTS[0]
    if not weights.is_file():
        return  # a .bin adapter: shapes are checked by peft at load
    modules = dict(_meta_model(base.config).named_modules())
    for key, shape in safetensors_shapes(weights).items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module_name = key.split(".lora_")[0].removeprefix("base_model.model.")
        module = modules.get(module_name)
        if module is None:
            raise DriftInputError(f"{adapter.path}: this adapter (made for {named}) adapts {module_name}, which "
                                  f"the base ({base.spec}) does not have: it was made for another base model")
        if isinstance(module, nn.Linear):
            want = module.in_features if ".lora_A." in key else module.out_features
            have = shape[1] if ".lora_A." in key else shape[0]
            if want != have:
                side = "input" if ".lora_A." in key else "output"
                raise DriftInputError(f"{adapter.path}: this adapter (made for {named}) gives {module_name} an "
                                      f"{side} width of {have}, the base ({base.spec}) has {want}: it was made "
                                      "for another base model")


def load(source: ModelSource, base: ModelSource, *, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode. An adapter is loaded over a fresh copy of the base
    and merged into it (so the forward pass costs what the base costs)."""
    from monitor.models import load_model

    if source.kind == "full":
        return load_model(str(source.path), dtype=dtype)
    try:
        from peft import PeftModel
    except ImportError:
        raise DriftInputError(f"{source.path} is a PEFT adapter; install peft to apply it: "
                              "pip install 'sae-monitor[drift]'") from None
    model, tokenizer = load_model(str(base.path), dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(source.path)).merge_and_unload()
    merged.eval()
    return merged, tokenizer
