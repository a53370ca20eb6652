"""``import monitor`` is cheap (no torch) and its public names behave as the eager imports did."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_import_monitor_loads_no_torch_and_every_public_name_resolves():
    out = run("import sys, monitor\n"
              "print('torch' in sys.modules)\n"
              "missing = [n for n in monitor.__all__ if getattr(monitor, n, None) is None]\n"
              "print(missing, 'torch' in sys.modules)")
    assert out.splitlines() == ["False", "[] True"]


def test_names_shadowed_by_submodules_and_submodule_attributes_still_work():
    # `monitor.capture` is the function although the submodule of that name gets imported;
    # `import monitor; monitor.wrapper.X` worked when __init__ imported every module eagerly.
    out = run("import monitor, monitor.capture\n"
              "from monitor import capture\n"
              "print(callable(capture) and capture.__module__ == 'monitor.capture')\n"
              "print(monitor.wrapper.Monitor is monitor.Monitor)\n"
              "try:\n    monitor.no_such_name\nexcept AttributeError as exc:\n    print(exc)")
    assert out.splitlines() == ["True", "True", "module 'monitor' has no attribute 'no_such_name'"]
