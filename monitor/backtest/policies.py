"""Policy versions for a backtest: a directory of policy files, or the same files at a git revision.

``--against main~3`` means "the policy files at the path given to ``--policies``, as they were in
revision ``main~3`` of the repository holding them": they are materialised with ``git archive``
into a temporary directory and compiled like any other directory, so a reviewer can diff a
change against what is deployed without checking anything out.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from monitor.catalog import Catalog
from monitor.errors import PolicyError
from monitor.policy import CompiledPolicy, compile_policies, load_policies


@dataclass(frozen=True)
class PolicyVersion:
    """A compiled policy set with where it came from (``source``: a path or ``REV:path``)."""

    label: str
    source: str
    policy: CompiledPolicy

    def describe(self) -> dict[str, str]:
        return {"label": self.label, "version_id": self.policy.version_id, "source": self.source}


def compile_dir(path: str | Path, catalog: Catalog | None, d_sae: int) -> CompiledPolicy:
    """Load and compile the policy files at ``path`` (PolicyError lists every problem)."""
    return compile_policies(load_policies(path, catalog, d_sae=d_sae), catalog, d_sae=d_sae)


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)


def materialise(rev: str, policies: str | Path, into: Path) -> Path:
    """The files under ``policies`` (a path inside a git work tree) at revision ``rev``,
    extracted below ``into``; returns the directory (or file) that corresponds to ``policies``."""
    target = Path(policies).resolve()
    base = target if target.is_dir() else target.parent
    top = _git(["rev-parse", "--show-toplevel"], base)
    if top.returncode != 0:
        raise PolicyError(f"--against {rev!r} is not a directory, and {policies} is not inside a git "
                          "repository, so it cannot be read as a git revision either")
    root = Path(top.stdout.decode().strip())
    if _git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], root).returncode != 0:
        raise PolicyError(f"--against {rev!r}: neither a directory nor a revision of {root} "
                          "(give a policy directory, a branch, a tag or a commit)")
    rel = target.relative_to(root).as_posix()
    archive = _git(["archive", "--format=tar", rev, "--", rel], root)
    if archive.returncode != 0:
        raise PolicyError(f"--against {rev!r}: {rel} does not exist at that revision "
                          f"({archive.stderr.decode().strip()})")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into / rel


def resolve(policies: str | Path, against: str | None, catalog: Catalog | None, d_sae: int,
            workdir: Path | None = None) -> list[PolicyVersion]:
    """The candidate version (``policies``) and, with ``against``, the baseline: a directory
    when such a path exists, else a git revision of the repository holding ``policies``."""
    versions = [PolicyVersion("candidate", str(policies), compile_dir(policies, catalog, d_sae))]
    if against is None:
        return versions
    if Path(against).exists():
        versions.append(PolicyVersion("baseline", str(against), compile_dir(against, catalog, d_sae)))
        return versions
    into = workdir or Path(tempfile.mkdtemp(prefix="sae-monitor-backtest-"))
    path = materialise(against, policies, into)
    versions.append(PolicyVersion("baseline", f"{against}:{Path(policies).as_posix()}",
                                  compile_dir(path, catalog, d_sae)))
    return versions
