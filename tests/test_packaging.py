"""The wheel a user installs carries everything ``Monitor.from_default()`` needs but the model:
the shipped SAE, its catalog and the shipped policies, found without a source checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run inside the installed copy only: PYTHONPATH puts it before the editable install.
PROBE = """
import json
from monitor.catalog import load_catalog
from monitor.policy import compile_policies, load_policies
from monitor.sae import load_sae
from monitor.shipped import SHIPPED_CATALOG, shipped_policies_dir

sae = load_sae("default")
catalog = load_catalog(SHIPPED_CATALOG, d_sae=sae.cfg.d_sae)
policies = shipped_policies_dir()
compiled = compile_policies(load_policies(policies), catalog, d_sae=sae.cfg.d_sae)
print(json.dumps({"policies": str(policies), "sae": str(sae.cfg.d_sae),
                  "rules": [r.id for r in compiled.rules]}))
"""


def _copy_checkout(target: Path) -> None:
    """Copy the files git would give a fresh clone (tracked, or new and not ignored), never the ignored
    virtual environments and caches: ``.venv-vllm`` alone is gigabytes and once filled CI's disk."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=False)
    if listed.returncode != 0:  # not a git checkout (an unpacked sdist): copy all but the usual litter
        shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(
            ".venv*", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"))
        return
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():  # a deleted but still tracked file is listed too
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


def test_the_wheel_ships_the_sae_catalog_and_policies(tmp_path):
    # Build from a copy: setuptools reuses an in-tree build/ and could package stale files.
    source = tmp_path / "source"
    _copy_checkout(source)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True,
                           timeout=300, check=False)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("sae_monitor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("monitor/saes/default/sae_weights.safetensors", "monitor/saes/default/catalog.yaml",
                    "monitor/default_policies/unsafe_code.yaml", "monitor/default_policies/schema.json",
                    "monitor/py.typed"):
        assert shipped in names
    assert not any(n.startswith(("tests/", "policies/", "scripts/", "datasets/")) for n in names)
    # discovery data is not policy: nothing but policies, their tests and the schema ships there
    assert not any("devsets" in n for n in names)
    # every subpackage of the source tree is in the wheel (pyproject lists them one by one)
    subpackages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "monitor").rglob("__init__.py")}
    assert {f"{package}/__init__.py" for package in subpackages} <= names
    (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")
                       or n.endswith(".dist-info/LICENSE")]
    assert "Apache License" in zipfile.ZipFile(wheel).read(license_file).decode()

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300, check=False)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=tmp_path,
                           env=env, timeout=300, check=False)
    assert probe.returncode == 0, probe.stderr[-2000:]
    found = json.loads(probe.stdout)
    assert Path(found["policies"]) == site / "monitor" / "default_policies"
    assert "unsafe_code.shell_execution.block" in found["rules"] and found["sae"] == "8192"
