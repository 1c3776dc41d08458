"""Who may import what: torch.distributed only inside parallel/, deepspeed only in runtime/engine.py.

Read from the source with ast (imports anywhere in a file, lazy ones inside functions included), over the
package and tools/. Benchmarks are outside the rule: they time DeepSpeed's own MoE layer beside ours.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _imports(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "torch":
                names.update(f"torch.{a.name}" for a in node.names)
    return names


def _sources():
    for top in ("megatron_mhmoe", "tools"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    yield os.path.relpath(path, ROOT), _imports(path)


def test_torch_distributed_only_in_parallel():
    offenders = sorted(rel for rel, names in _sources()
                       if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names)
                       and not rel.startswith(os.path.join("megatron_mhmoe", "parallel") + os.sep))
    assert offenders == [], f"torch.distributed imported outside megatron_mhmoe/parallel/: {offenders}"


def test_deepspeed_only_in_the_engine():
    engine = os.path.join("megatron_mhmoe", "runtime", "engine.py")
    offenders = sorted(rel for rel, names in _sources()
                       if any(n == "deepspeed" or n.startswith("deepspeed.") for n in names) and rel != engine)
    assert offenders == [], f"deepspeed imported outside {engine}: {offenders}"
