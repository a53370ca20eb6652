"""The package version, from one source: ``version`` in ``pyproject.toml``.

An installed package (wheel or editable) reads it from its metadata, which pip wrote from
``pyproject.toml``; a source checkout that was never installed (``PYTHONPATH=.``) reads
``pyproject.toml`` beside the package. No other file states the version. This module imports
nothing heavy, so ``sae-monitor --version`` stays fast.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "sae-monitor"
UNKNOWN = "0+unknown"

_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
_VERSION_LINE = re.compile(r'^version\s*=\s*"([^"]+)"\s*$', re.MULTILINE)


def package_version() -> str:
    """The installed distribution's version, else the source checkout's ``pyproject.toml``
    ``[project] version``, else ``"0+unknown"`` (a copy of the package without either)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return source_version(_PYPROJECT) or UNKNOWN


def source_version(pyproject: Path) -> str | None:
    """``version`` of the ``[project]`` table of a ``pyproject.toml``, or None if unreadable.

    A regular expression, not ``tomllib``, because Python 3.10 (supported) has no ``tomllib``.
    """
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return None
    project = text.partition("[project]")[2].split("\n[", 1)[0]
    match = _VERSION_LINE.search(project)
    return match.group(1) if match else None


__version__ = package_version()
