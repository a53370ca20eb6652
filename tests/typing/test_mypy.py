"""The package type-checks, and so does user code written from the README, under ``--strict``.

mypy runs in a subprocess with this interpreter, from the repository root, so it reads the
``[tool.mypy]`` section of pyproject.toml and checks this checkout's ``monitor``. The strict
run keeps its own cache directory: its options differ from the package run's, and one shared
cache would be rebuilt (minutes) every time the two alternate.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = Path(__file__).with_name("readme_examples.py")
STRICT = ["--strict", "--follow-imports=silent", "--cache-dir", str(ROOT / ".mypy_cache" / "strict")]


def mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200, check=False)


def test_package_is_mypy_clean():
    proc = mypy("-p", "monitor")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_readme_examples_type_check_strict():
    proc = mypy(*STRICT, str(EXAMPLES))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_strict_run_reports_a_type_error(tmp_path):
    # The harness itself can fail: the same strict run rejects a misuse of the same API.
    bad = tmp_path / "bad.py"
    bad.write_text("import monitor\n\n"
                   "def f() -> int:\n"
                   "    return monitor.from_default().last_report.outcome\n")
    proc = mypy(*STRICT, str(bad))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'Incompatible return value type (got "Literal[' in proc.stdout, proc.stdout


def test_examples_cover_the_readme_python_blocks():
    # Every `monitor.<name>` and `from monitor... import` the README's Python shows is
    # exercised by readme_examples.py, so the file cannot silently fall behind the README.
    readme = (ROOT / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```python\n(.*?)```", readme, flags=re.S))
    assert blocks, "README.md has no ```python blocks"
    examples = EXAMPLES.read_text()
    used = set(re.findall(r"\bmonitor\.(\w+)\(", blocks)) | set(re.findall(r"^from (monitor[\w.]*) import", blocks, re.M))
    missing = sorted(u for u in used if f"monitor.{u}(" not in examples and f"from {u} import" not in examples)
    assert not missing, f"README Python uses {missing}; add them to {EXAMPLES.name}"


def test_every_public_name_is_reexported_for_type_checkers():
    # monitor/__init__.py imports lazily (PEP 562); its TYPE_CHECKING block is what mypy sees.
    # A name missing there, or imported without `as` (not re-exported under --strict), is
    # invisible to typed callers although `monitor.<name>` works at run time.
    tree = ast.parse((ROOT / "monitor" / "__init__.py").read_text())
    exports: dict[str, str] = {}
    checked: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "_EXPORTS":
            exports = ast.literal_eval(node.value)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom), ast.dump(imp)
                for alias in imp.names:
                    assert alias.asname == alias.name, f"write `{alias.name} as {alias.name}` to re-export it"
                    checked[alias.name] = imp.module or ""
    assert exports and checked == exports


def test_make_test_runs_mypy_before_pytest():
    plan = subprocess.run(["make", "-s", "--no-print-directory", "-n", "test"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False).stdout
    lines = plan.splitlines()
    mypy_at = [i for i, line in enumerate(lines) if "-m mypy -p monitor" in line]
    pytest_at = [i for i, line in enumerate(lines) if "-m pytest" in line]
    assert mypy_at and pytest_at and mypy_at[0] < pytest_at[0], plan
