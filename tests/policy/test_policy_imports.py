"""Loading and validating policies never imports torch (``policy check`` runs in pre-commit hooks).

The check runs in a fresh interpreter. ``monitor/__init__.py`` is bypassed (a bare package
object stands in for it) so that what is measured is the policy package and the YAML loader,
whatever the top-level package chooses to import eagerly.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "monitor"

SCRIPT = """
import sys, types
package = types.ModuleType("monitor")
package.__path__ = [{package!r}]
sys.modules["monitor"] = package

from pathlib import Path
from monitor.catalog import load_catalog
from monitor.policy import PolicySet, Rule, load_policies, policy_json_schema
from monitor.policy.cases import find_case_files, load_case_files
from monitor.policy.checks import binding_problems
import monitor.policy.schema, monitor.policy.tree, monitor.yaml_source, monitor.yaml_messages

root = Path({root!r})
(root / "cat.yml.txt").write_text("sae: s\\nlayer: 1\\nfeatures:\\n  - {{name: a.b, latent: 3}}\\n")
(root / "p.yaml").write_text("version: 1\\nrules:\\n  - {{id: r, description: d, severity: low, "
                             "when: {{feature: a.b, above: 1}}, actions: [log]}}\\n")
(root / "p.tests.yaml").write_text("cases:\\n  - {{name: c, text: hi, expect: {{triggers: [r]}}}}\\n")
catalog = load_catalog(root / "cat.yml.txt", d_sae=8)
policy_set = load_policies(root, catalog, d_sae=8)
assert binding_problems(policy_set, catalog, 8) == []
(case_file,) = load_case_files(find_case_files(root).case_files, catalog, d_sae=8)
policy_json_schema()
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("torch modules:", len(loaded))
"""


def test_loading_and_checking_policies_does_not_import_torch(tmp_path):
    code = textwrap.dedent(SCRIPT.format(package=str(PACKAGE), root=str(tmp_path)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch modules: 0"


def test_the_engine_names_still_import_from_the_package():
    from monitor.policy import CompiledPolicy, PolicyStore, compile_policies
    from monitor.policy.compile import compile_policies as direct
    from monitor.policy.engine import CompiledPolicy as engine_cls

    assert compile_policies is direct and CompiledPolicy is engine_cls
    assert PolicyStore.__module__ == "monitor.policy.reload"
