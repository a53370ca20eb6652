#!/usr/bin/env python
"""Measure the package's architecture: import floors, upward imports, private-name imports,
largest files and classes.

    python tools/architecture.py            # a summary table
    python tools/architecture.py --check    # exit 1 on an import cycle, a private-name import,
                                            # a file over --max-lines or a class over --max-class

A module's *floor* is 0 when it imports no other module of the package, else one more than the
highest floor among what it imports (all runtime imports, including those inside functions: a
lazy import is still a dependency; imports under ``if TYPE_CHECKING:`` and in a module's
PEP 562 ``__getattr__`` serving moved names are not). A cycle makes floors undefined and is reported.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "monitor"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(name: str, modules: set[str]) -> str | None:
    """The package module ``name`` refers to (a module, or the package holding a name)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def scan() -> tuple[dict[str, set[str]], list[str], dict[str, int], list[tuple[str, str, int]]]:
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(f) for f in files}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private: list[str] = []
    lines: dict[str, int] = {}
    classes: list[tuple[str, str, int]] = []
    for f in files:
        mod = module_name(f)
        text = f.read_text(encoding="utf-8")
        lines[mod] = text.count("\n")
        tree = ast.parse(text)
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                       for stmt in block.body for n in ast.walk(stmt)}
        # a module-level __getattr__ (PEP 562) serves moved names lazily: not a dependency
        typing_only |= {id(n) for fn in tree.body if isinstance(fn, ast.FunctionDef)
                        and fn.name == "__getattr__" for n in ast.walk(fn)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ClassDef):
                classes.append((mod, node.name, (node.end_lineno or node.lineno) - node.lineno + 1))
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = resolve(alias.name, modules)
                    if target and target != mod:
                        edges[mod].add(target)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = resolve(node.module, modules)
                for alias in node.names:
                    sub = resolve(f"{node.module}.{alias.name}", modules)
                    target = sub if sub and sub != base else base
                    if target and target != mod and not mod.startswith(target + ".") and target != PACKAGE:
                        edges[mod].add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and base and base != mod:
                        private.append(f"{mod} imports {node.module}.{alias.name}")
    return edges, private, lines, classes


def floors(edges: dict[str, set[str]]) -> tuple[dict[str, int], list[str]]:
    result: dict[str, int] = {}
    cycles: list[str] = []
    visiting: list[str] = []

    def visit(m: str) -> int:
        if m in result:
            return result[m]
        if m in visiting:
            cycles.append(" -> ".join(visiting[visiting.index(m):] + [m]))
            return 0
        visiting.append(m)
        deps = [d for d in edges[m] if d != m and not d == PACKAGE]
        value = 1 + max((visit(d) for d in deps), default=-1)
        visiting.pop()
        result[m] = value
        return value

    for m in sorted(edges):
        visit(m)
    return result, cycles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--max-lines", type=int, default=450)
    parser.add_argument("--max-class", type=int, default=200)
    args = parser.parse_args(argv)
    edges, private, lines, classes = scan()
    level, cycles = floors(edges)
    print(f"modules: {len(edges)}  floors: {max(level.values()) + 1}  cycles: {len(cycles)}")
    for cycle in cycles:
        print(f"  cycle: {cycle}")
    big = sorted(lines.items(), key=lambda kv: -kv[1])[:5]
    print("largest files: " + ", ".join(f"{m} {n}" for m, n in big))
    top = sorted(classes, key=lambda c: -c[2])[:5]
    print("largest classes: " + ", ".join(f"{m}.{c} {n}" for m, c, n in top))
    print(f"private-name imports: {len(private)}")
    for p in private:
        print(f"  {p}")
    for floor in range(max(level.values()) + 1):
        print(f"  floor {floor}: " + ", ".join(sorted(m for m, v in level.items() if v == floor)))
    failed = bool(cycles or private) or any(n > args.max_lines for n in lines.values()) \
        or any(n > args.max_class for _, _, n in classes)
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
