"""What ships with sae-monitor, found in one place: the SAEs, their catalogs, the policies.

Everything that needs a shipped artefact asks here, so an installed wheel and a source
checkout behave the same: the wheel carries the policies as ``monitor/default_policies``; an
editable install reads ``policies/`` of the checkout, so edits there take effect.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeGuard

from monitor.errors import MonitorError

PACKAGE = Path(__file__).resolve().parent
SHIPPED_SAES = PACKAGE / "saes"
INSTALLED_POLICIES = PACKAGE / "default_policies"
REPO_POLICIES = PACKAGE.parent / "policies"
CATALOG_FILE = "catalog.yaml"


def shipped_sae_dir(name: str = "default") -> Path:
    """Directory of the shipped SAE ``name`` (may not exist; :func:`monitor.sae.load_sae` says so)."""
    return SHIPPED_SAES / name


def is_shipped_sae_name(name: object) -> TypeGuard[str]:
    """True when ``name`` names a shipped SAE (a bare name, not a path)."""
    return isinstance(name, str) and "/" not in name and shipped_sae_dir(name).is_dir()


def catalog_beside(sae_dir: str | Path | None) -> Path | None:
    """The feature catalog stored beside an SAE (``catalog.yaml`` in its directory, or beside
    a Gemma Scope ``params.npz``), or None. ``sae_dir`` may be a shipped SAE's name."""
    if sae_dir is None:
        return None
    path = shipped_sae_dir(sae_dir) if is_shipped_sae_name(sae_dir) else Path(sae_dir)
    folder = path.parent if path.is_file() else path
    candidate = folder / CATALOG_FILE
    return candidate if candidate.is_file() else None


def shipped_catalog(name: str = "default") -> Path | None:
    """The catalog of the shipped SAE ``name``, or None when it has none."""
    return catalog_beside(shipped_sae_dir(name))


def shipped_policies_dir() -> Path:
    """The shipped policies: the wheel's copy when installed, else the checkout's
    ``policies/``. Raises :class:`MonitorError` naming both places when neither exists."""
    for candidate in (INSTALLED_POLICIES, REPO_POLICIES):
        if candidate.is_dir():
            return candidate
    raise MonitorError(
        f"the shipped policies were found neither at {INSTALLED_POLICIES} nor at {REPO_POLICIES}; "
        "reinstall sae-monitor, or pass policies=PATH to wrap()/from_default() (--policies on the CLI)"
    )


#: The default SAE's catalog file (kept for code that used ``monitor.wrapper.SHIPPED_CATALOG``).
SHIPPED_CATALOG = SHIPPED_SAES / "default" / CATALOG_FILE
