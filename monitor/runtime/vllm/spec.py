"""What a vLLM worker needs to monitor: a small picklable description, sent by ``collective_rpc``.

The front end builds one :class:`MonitorSpec` and every worker (every tensor- and
pipeline-parallel rank, every data-parallel replica) builds the same SAE, catalog and compiled
policy from it. Paths, not objects: a worker may run on another machine (Ray), so it reads
the files itself, and a policy reload sends the same spec again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: The key of ``SamplingParams.extra_args`` that puts a request under the monitor.
EXTRA_ARGS_KEY = "sae_monitor"


@dataclass(frozen=True)
class MonitorSpec:
    """Everything a worker reads to monitor requests.

    ``sae``: a shipped SAE name or a directory; ``policies``: policy files/directories;
    ``catalog``: the catalog file (or None); ``on_error``: ``open`` or ``closed`` (already
    resolved from ``auto`` by the front end); ``special_ids``: token ids never monitored
    (the tokenizer's special tokens), empty when ``include_special_tokens``; ``stop_token_id``:
    the token a blocked request is forced to sample so that the scheduler ends it (the EOS).
    """

    sae: str
    policies: tuple[str, ...]
    catalog: str | None
    on_error: Literal["open", "closed"]
    special_ids: tuple[int, ...]
    stop_token_id: int
