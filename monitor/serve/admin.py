"""Who may call the admin endpoints, and policy reloads on a signal.

Without an admin token, ``/admin/*`` answers only loopback clients (a reload changes what the
service enforces; it must not be open to the network by default). With a token, every client
must present ``Authorization: Bearer <token>`` (scheme case-insensitive, as RFC 7235 says),
compared in constant time so the answer time does not reveal how much of a guess was right.

:class:`ReloadSignal` installs the ``SIGHUP`` handler before the model loads (an unhandled
SIGHUP would kill the process) and queues a reload that arrives before there is a monitor to
reload; the reload itself always runs in a thread, never inside the signal handler.
"""

from __future__ import annotations

import hmac
import ipaddress
import signal
import threading
from typing import Any

import structlog

from monitor.errors import MonitorError
from monitor.serve.schema import APIError

_log = structlog.get_logger("sae_monitor")


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for names and unknown clients."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def check_admin(authorization: str | None, client_host: str | None, token: str | None) -> None:
    """Raise a 401/403 :class:`APIError` unless this caller may use the admin endpoints."""
    if token is None:
        if is_loopback(client_host):
            return
        raise APIError(403, "admin endpoints answer only loopback clients unless an admin token "
                       "is configured (SAE_MONITOR_ADMIN_TOKEN)", type="permission_error",
                       code="admin_forbidden")
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    given = credentials.strip().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, token.encode()):
        raise APIError(401, "missing or wrong admin token", type="authentication_error",
                       code="invalid_admin_token")


class ReloadSignal:
    """Reload policies on ``signum`` (default SIGHUP); install first, attach the monitor later.

    A signal that arrives before :meth:`attach` is remembered and runs once the monitor is
    attached. :meth:`restore` puts the previous handler back.
    """

    def __init__(self, signum: int | None = None) -> None:
        self.signum = signum if signum is not None else signal.SIGHUP
        self.monitor: Any = None
        self.pending = False
        self.lock = threading.Lock()
        self.previous: Any = None
        self.installed = False

    def install(self) -> ReloadSignal:
        """Install the handler (main thread only; elsewhere Python refuses signal handlers)."""
        self.previous = signal.signal(self.signum, self._handler)
        self.installed = True
        return self

    def attach(self, monitor: Any) -> None:
        """Reload ``monitor`` on later signals; run a reload queued before now."""
        with self.lock:
            self.monitor = monitor
            queued, self.pending = self.pending, False
        if queued:
            _log.info("policy_reload_signal_queued_run")
            self._start()

    def restore(self) -> None:
        if self.installed:
            signal.signal(self.signum, self.previous)
            self.installed = False

    def _handler(self, _signum: int, _frame: Any) -> None:
        with self.lock:
            if self.monitor is None:
                self.pending = True
                return
        self._start()

    def _start(self) -> None:
        threading.Thread(target=self._reload, name="policy-reload-signal", daemon=True).start()

    def _reload(self) -> None:
        try:
            result = self.monitor.reload_policies()
            _log.info("policy_reload_signal", ok=result.ok, version_id=result.version_id)
        except MonitorError as exc:
            _log.error("policy_reload_signal_failed", error=str(exc))


def install_reload_signal(monitor: Any, signum: int | None = None) -> Any:
    """Reload ``monitor``'s policies when ``signum`` (SIGHUP) arrives; returns the previous
    handler. The reload runs in a new thread, never inside the signal handler."""
    reload = ReloadSignal(signum).install()
    reload.attach(monitor)
    return reload.previous
