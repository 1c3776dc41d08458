"""benchmarks/moe_two_node.py without namespaces: the skip without root, and the uniform-routing byte
predictions it prints (the `formula MB` column quoted in the README) for its default shape."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import moe_two_node  # noqa: E402


def test_skips_without_root(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert moe_two_node.main([]) == 0
    assert capsys.readouterr().out.startswith("SKIP moe_two_node: needs root")


@pytest.mark.parametrize("shape,mode,mb", [
    ("mhmoe", "flat", 33.555), ("mhmoe", "two-level", 25.735), ("mhmoe", "two-level+overlap", 25.735),
    ("mhmoe", "two-level+group-lim", 16.975), ("smoe", "flat", 33.555), ("smoe", "two-level", 25.511),
    ("smoe", "two-level+group-lim", 16.827)])
def test_default_predictions(shape, mode, mb):
    args = moe_two_node.parse_args([])
    assert f"{moe_two_node.predicted_bytes(args, shape, mode) / 1e6:.3f}" == f"{mb:.3f}"
