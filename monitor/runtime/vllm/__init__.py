"""sae-monitor on vLLM: monitored generation inside vLLM's engine (optional extra ``sae-monitor[vllm]``).

Stages (one module each, data flowing one way):
``batch`` (flat token batch -> per-request spans) -> ``columns`` (residual rows -> watched
feature columns) -> ``tracker`` (per-request policy engine) -> ``worker`` (the hook that ties
them together inside each vLLM worker and applies steering and stops) ; ``engine`` is the front
end (requests in, completions and reports out), ``serve`` what the OpenAI app calls.

Importing this package does not import vLLM; :func:`require_vllm` raises a
:class:`~monitor.errors.MonitorError` naming the extra when it is missing.
"""

from monitor.runtime.vllm.setup import (EngineFailed, MonitorConfig, require_vllm, resolve_engine,
                                        vllm_available)

__all__ = ["EngineFailed", "MonitorConfig", "require_vllm", "resolve_engine", "vllm_available"]
