"""Every import of our own package names something that exists: also the imports inside functions, which
importing a module does not run (a module moved to another subpackage left one behind once:
runtime/step_breakdown.py's `from megatron_mhmoe.runtime.cli import ...`, after cli moved to launch/)."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREES = ("megatron_mhmoe", "tools", "benchmarks", "tests", "launch")


def own_imports():
    for tree in TREES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, tree)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
                    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                            and node.module.split(".")[0] == "megatron_mhmoe":
                        yield os.path.relpath(path, ROOT), node.lineno, node.module, [a.name for a in node.names]
                    elif isinstance(node, ast.Import):
                        for a in node.names:
                            if a.name.split(".")[0] == "megatron_mhmoe":
                                yield os.path.relpath(path, ROOT), node.lineno, a.name, []


def resolves(module: str, names: list) -> bool:
    if importlib.util.find_spec(module) is None:
        return False
    mod = importlib.import_module(module)
    return all(n == "*" or hasattr(mod, n) or importlib.util.find_spec(f"{module}.{n}") is not None for n in names)


def test_every_own_import_resolves():
    found = list(own_imports())
    assert len(found) > 500  # the walk sees the imports
    bad = [f"{path}:{line}: {module} {names}" for path, line, module, names in found if not resolves(module, names)]
    assert bad == []
