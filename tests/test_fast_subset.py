"""`make test-fast` must still exercise every subpackage of megatron_mhmoe, and name only real files."""
from __future__ import annotations

import os
import re

from tests.conftest import HERE, SLOW_FILES

PKG = os.path.join(os.path.dirname(HERE), "megatron_mhmoe")


def _test_files() -> list[str]:
    out = []
    for root, _dirs, files in os.walk(HERE):
        for f in files:
            if f.startswith("test_") and f.endswith(".py"):
                out.append(os.path.relpath(os.path.join(root, f), HERE).replace(os.sep, "/"))
    return out


def test_slow_list_names_existing_files():
    files = set(_test_files())
    missing = sorted(f for f in SLOW_FILES if f not in files)
    assert not missing, f"tests/conftest.py SLOW_FILES names files that do not exist: {missing}"


def test_fast_subset_imports_every_subpackage():
    subpackages = sorted(d for d in os.listdir(PKG)
                         if os.path.isfile(os.path.join(PKG, d, "__init__.py")))
    assert len(subpackages) >= 6, subpackages
    fast = [f for f in _test_files() if f not in SLOW_FILES]
    untouched = []
    for sub in subpackages:
        pattern = re.compile(rf"\bmegatron_mhmoe\.{sub}\b|from megatron_mhmoe import [^\n]*\b{sub}\b")
        if not any(pattern.search(open(os.path.join(HERE, f), encoding="utf-8").read()) for f in fast):
            untouched.append(sub)
    assert not untouched, f"no test in `make test-fast` imports megatron_mhmoe.{untouched}: move one out of SLOW_FILES"
