"""``sae-monitor --version``, ``policy check`` and ``policy test --help`` do not import torch:
they run in shells and pre-commit hooks, where importing torch would be most of their time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

# Runs a command in a fresh interpreter, then reports its status and the heavy modules loaded.
PROBE = """
import json, sys
from monitor.cli import main
try:
    status = main(json.loads(sys.argv[1]))
except SystemExit as exc:
    status = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print("\\nPROBE " + json.dumps({"status": status, "heavy": heavy}))
"""


def run_probe(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.rsplit("\nPROBE ", 1)[1])


@pytest.mark.parametrize("argv", [
    ["--version"],
    ["policy", "test", "--help"],
    ["policy", "check", str(ROOT / "policies")],
])
def test_light_commands_do_not_import_torch(argv):
    result = run_probe(argv)
    assert result["status"] == 0
    assert result["heavy"] == []


def test_the_probe_sees_torch_when_a_command_loads_it(tmp_path):
    # The probe itself can fail: `info` reads the model and SAE modules, which import torch.
    result = run_probe(["info", "--json"])
    assert result["status"] == 0 and "torch" in result["heavy"]
