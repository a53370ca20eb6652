"""The worker extension vLLM mixes into every worker (``worker_extension_cls``).

The front end reaches these methods with ``collective_rpc`` (one call reaches every rank of
every parallel group). Arguments and results cross process boundaries through vLLM's
msgspec serialiser, so structured values travel as pickled bytes between our own processes.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict
from typing import Any

from monitor.runtime.vllm.spec import MonitorSpec

#: The qualified name to pass as ``worker_extension_cls``.
EXTENSION = "monitor.runtime.vllm.extension.MonitorWorkerExtension"


class MonitorWorkerExtension:
    """Methods added to vLLM's worker class; ``self`` is the worker (``self.model_runner``)."""

    model_runner: Any  # provided by vLLM's worker this class is mixed into

    def sae_monitor_install(self, spec: bytes) -> dict[str, Any]:
        """Load the SAE, catalog and policies named by ``spec`` and hook the model."""
        from monitor.runtime.vllm.worker import WorkerMonitor

        current = getattr(self, "_sae_monitor", None)
        if current is not None:
            current.remove()
        monitor = WorkerMonitor(self.model_runner, MonitorSpec(**pickle.loads(spec)))
        self._sae_monitor = monitor
        return monitor.status()

    def sae_monitor_reload(self) -> str:
        """Reload the policy files; return the new version id (raises if they are invalid)."""
        return self._sae_monitor_get().reload()

    def sae_monitor_collect(self, req_id: str) -> bytes | None:
        """The pickled :class:`~monitor.report.Report` of a request, or None."""
        report = self._sae_monitor_get().collect(req_id)
        return None if report is None else pickle.dumps(report)

    def sae_monitor_collect_many(self, req_ids: list[str]) -> list[bytes | None]:
        """:meth:`sae_monitor_collect` for many requests in one call (requests that end together)."""
        monitor = self._sae_monitor_get()
        return [None if (report := monitor.collect(r)) is None else pickle.dumps(report) for r in req_ids]

    def sae_monitor_status(self) -> dict[str, Any]:
        return self._sae_monitor_get().status()

    def _sae_monitor_get(self) -> Any:
        monitor = getattr(self, "_sae_monitor", None)
        if monitor is None:
            raise RuntimeError("sae-monitor is not installed on this worker; call sae_monitor_install first")
        return monitor


def encode_spec(spec: MonitorSpec) -> bytes:
    """``spec`` as the bytes :meth:`MonitorWorkerExtension.sae_monitor_install` takes."""
    return pickle.dumps(asdict(spec))
