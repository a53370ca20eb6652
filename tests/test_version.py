"""One version source: pyproject's ``version``, read from the package metadata when installed
and from pyproject.toml in a source checkout that is not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import monitor
from monitor.version import UNKNOWN, package_version, source_version

ROOT = Path(__file__).resolve().parent.parent


def test_the_metadata_pyproject_and_package_agree():
    declared = source_version(ROOT / "pyproject.toml")
    assert declared is not None and declared.count(".") >= 2
    assert metadata.version("sae-monitor") == declared == package_version() == monitor.__version__


def test_source_version_reads_the_project_table_only(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[build-system]\nversion = "9.9"\n\n[project]\nname = "x"\n'
                         'version = "1.2.3rc1"\n\n[tool.other]\nversion = "7"\n')
    assert source_version(pyproject) == "1.2.3rc1"
    pyproject.write_text('[project]\nname = "x"\ndynamic = ["version"]\n')
    assert source_version(pyproject) is None
    assert source_version(tmp_path / "missing.toml") is None


def test_an_uninstalled_checkout_reads_its_pyproject(tmp_path):
    # a copy of the package where no metadata is found: pyproject beside it, then nothing
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "monitor", checkout / "monitor",
                    ignore=shutil.ignore_patterns("__pycache__", "saes"))
    (checkout / "pyproject.toml").write_text('[project]\nname = "sae-monitor"\nversion = "4.5.6"\n')
    probe = ("import importlib.metadata as m\n"
             "def missing(name): raise m.PackageNotFoundError(name)\n"
             "m.version = missing\n"
             "import monitor; print(monitor.__version__)")
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    run = lambda: subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,  # noqa: E731
                                 cwd=checkout, env=env, timeout=120, check=True).stdout.strip()
    assert run() == "4.5.6"
    (checkout / "pyproject.toml").unlink()
    assert run() == UNKNOWN
