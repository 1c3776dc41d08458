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


def test_readme_table_is_summarize_of_the_final_runs():
    runs = [os.path.join(REPO, "benchmarks", "results", f"2026-12-01-moe_two_node-final-run{i}.txt")
            for i in (1, 2, 3)]
    table = moe_two_node.summarize(runs).split("\n\n")[0]
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert table in readme, "README's two-node table is not benchmarks/moe_two_node.py --summarize of the final runs"
    for quoted in ("0.769 MH-MoE, 0.759 SMoE", "missed (1.28x, runs 1.00-1.51)", "missed (0.79x, runs 0.77-1.13)",
                   "inside a 667.7 ms step", "two-level 1.09x / 1.03x flat", "two-level + overlap 0.92x /\n0.87x",
                   "(with overlap) 0.59x / 0.57x"):
        assert quoted in readme, quoted
    rows = {tuple(line.split(" | ")[:3]): line.split(" | ") for line in table.splitlines()[2:]}
    assert rows[("| 1gbit", "mhmoe", "two-level+overlap")][4].startswith("1.28 [1.00-1.51]")
    assert rows[("| 1gbit", "mhmoe", "two-level+group-lim")][4].startswith("0.79 [0.77-1.13]")
    assert rows[("| 1gbit", "mhmoe", "flat")][3] == "667.7"
