"""The exception hierarchy of sae-monitor.

Every error the library raises on purpose derives from :class:`MonitorError`, so callers can
catch one type. Messages are written for the person who has to fix the problem: they name the
file, the thing that is wrong and what to do about it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from monitor.report import Report


class MonitorError(Exception):
    """Root of every error raised by sae-monitor."""


class ModelLoadError(MonitorError):
    """A model could not be found or loaded."""


class UnsupportedModelError(MonitorError):
    """The model's decoder blocks could not be located for hooking."""


class SAEFormatError(MonitorError):
    """An SAE file is missing, malformed, or does not match what it claims to be."""


class SAEMismatchError(MonitorError):
    """An SAE does not fit the model it is attached to (width, layer, or failed self-test)."""


class CatalogError(MonitorError):
    """A feature catalog is invalid (unknown latent, duplicate name, wrong SAE)."""


class PolicyError(MonitorError):
    """A policy file or directory is invalid. ``errors`` lists every problem found."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors: list[str] = list(errors or [])


class DataError(MonitorError):
    """An input data file (JSONL, text) is missing or malformed."""


class EngineError(MonitorError):
    """The policy engine was called with inputs that do not match the compiled policy or state."""


class Blocked(MonitorError):
    """Raised (with ``block_behavior="raise"``) when a policy blocks a request; ``report``
    says which rule, where and why."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


class MonitorUnavailable(MonitorError):
    """Monitoring failed and the monitor fails closed: the request is refused. ``report``
    carries the error and whatever was decided before it."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report
