"""Hot reload: keep the last good compiled policy, swap in new versions atomically.

A policy edit must never take monitoring down. :meth:`PolicyStore.reload` loads and compiles
the files again; if anything is wrong the new version is rejected, the error is returned (not
raised) and the last good policy stays active. A policy file that became a broken symbolic link,
a symlink loop or an unreadable entry is such an error (the loader never skips it), so a reload
never answers "ok" with a rule silently gone. Readers take ``store.current`` once per request
(a single attribute read, atomic under the GIL) and keep that object, with its own
``EngineState``, for the whole request, so a swap never mixes two versions in one request.

:meth:`PolicyStore.watch` is opt-in: a daemon thread polls the files' modification times and
sizes every ``interval_s`` and reloads on change. Subscribers registered with
:meth:`PolicyStore.on_reload` (metrics, audit logging) receive every :class:`ReloadResult`;
an exception in a subscriber is logged and swallowed so it cannot stop reloading.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from monitor.catalog import Catalog
from monitor.errors import MonitorError
from monitor.policy.compile import compile_policies
from monitor.policy.engine import CompiledPolicy
from monitor.policy.loader import load_policies, policy_files

PathsArg = str | Path | Sequence[str | Path]
Snapshot = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class ReloadResult:
    """Outcome of one reload attempt.

    ``ok`` False means the new files were rejected (``error`` says why, every problem listed)
    and the previous policy is still active. ``version_id`` is the active version after the
    attempt; ``changed`` is True when a different version became active.
    """

    ok: bool
    error: str | None
    version_id: str
    changed: bool


class PolicyStore:
    """Holds the current :class:`CompiledPolicy` for ``paths`` bound to ``catalog`` and ``d_sae``.

    The constructor loads the files once and raises :class:`~monitor.errors.PolicyError` if
    they are invalid (there is no last good version to fall back on at startup); after that,
    :meth:`reload` never raises for bad files. ``accept(policy)``, when given, is the engine's
    own check of a compiled policy (e.g. the vLLM engine reads one layer only): a
    :class:`~monitor.errors.MonitorError` from it rejects the files like any other error.
    """

    def __init__(self, paths: PathsArg, catalog: Catalog | None, d_sae: int, *,
                 accept: Callable[[CompiledPolicy], None] | None = None) -> None:
        self._paths = paths
        self._catalog = catalog
        self._d_sae = d_sae
        self._accept = accept
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[ReloadResult], None]] = []
        self._log = structlog.get_logger("monitor.policy")
        self._snapshot = _snapshot(paths)
        self._current: CompiledPolicy = self._build()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> CompiledPolicy:
        """The active compiled policy. Read once per request and keep it for that request."""
        return self._current

    @property
    def version_id(self) -> str:
        """Content hash of the active policy set."""
        return self._current.version_id

    def _build(self) -> CompiledPolicy:
        policies = load_policies(self._paths, self._catalog, d_sae=self._d_sae)
        compiled = compile_policies(policies, self._catalog, d_sae=self._d_sae)
        if self._accept is not None:
            self._accept(compiled)  # raises MonitorError for a policy the engine cannot run
        return compiled

    def on_reload(self, callback: Callable[[ReloadResult], None]) -> None:
        """Call ``callback(result)`` after every reload attempt, good or bad."""
        self._callbacks.append(callback)

    def reload(self) -> ReloadResult:
        """Load and compile the files again; activate the result only if it is valid."""
        with self._lock:
            self._snapshot = _snapshot(self._paths)
            old = self._current
            try:
                new = self._build()
            except MonitorError as exc:
                result = ReloadResult(False, str(exc), old.version_id, False)
                self._log.warning("policy_reload_rejected", version_id=old.version_id,
                                  problems=len(getattr(exc, "errors", []) or [1]))
            except Exception as exc:  # noqa: BLE001 - a reload must never take monitoring down
                result = ReloadResult(False, f"unexpected {type(exc).__name__}: {exc}",
                                      old.version_id, False)
                self._log.error("policy_reload_crashed", version_id=old.version_id,
                                error=repr(exc))
            else:
                changed = new.version_id != old.version_id
                if changed:
                    self._current = new
                result = ReloadResult(True, None, new.version_id, changed)
                self._log.info("policy_reloaded", version_id=new.version_id, changed=changed)
        for callback in list(self._callbacks):
            try:
                callback(result)
            except Exception as exc:  # noqa: BLE001 - subscribers must not break reloading
                self._log.error("policy_reload_callback_failed", callback=repr(callback),
                                error=repr(exc))
        return result

    def check_for_changes(self) -> ReloadResult | None:
        """Reload if any policy file's mtime or size changed (or files appeared/vanished)."""
        if _snapshot(self._paths) == self._snapshot:
            return None
        return self.reload()

    def watch(self, interval_s: float = 2.0) -> None:
        """Start a daemon thread calling :meth:`check_for_changes` every ``interval_s``."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, args=(interval_s,),
                                        name="policy-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the watch thread (no-op if not watching)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> PolicyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _poll(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.check_for_changes()
            except Exception as exc:  # noqa: BLE001 - keep polling whatever happens
                self._log.error("policy_watch_failed", error=repr(exc))


def _snapshot(paths: PathsArg) -> Snapshot:
    files, _ = policy_files(paths)
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((str(f), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(f), -1, -1))
    return tuple(out)
