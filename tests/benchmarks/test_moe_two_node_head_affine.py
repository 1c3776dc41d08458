"""benchmarks/moe_two_node.py's head-affine mode without namespaces: its byte prediction against flat's at
k = 2 and 4 (at most 1/k of flat's plus the packets' gate and id columns), the modes a run measures, the
node-traffic fields of its JSON lines and the node table --summarize adds for them."""
from __future__ import annotations

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import moe_two_node  # noqa: E402


@pytest.mark.parametrize("k,mb", [(2, 16.974), (4, 17.105)])
def test_head_affine_bytes_about_one_kth_of_flat(k, mb):
    args = moe_two_node.parse_args(["--top-k", str(k)])
    head = moe_two_node.predicted_bytes(args, "mhmoe", "head-affine")
    flat = moe_two_node.predicted_bytes(args, "mhmoe", "flat")
    assert f"{head / 1e6:.3f}" == f"{mb:.3f}"
    # 1/k of flat, plus (k + c) / (2 d_sub) for the gates and id columns a packet carries (here < 3%)
    assert flat / k < head <= flat / k * 1.03, (head, flat)


def test_modes_and_node_traffic():
    args = moe_two_node.parse_args(["--modes", "head-affine,two-level+group-lim"])
    assert moe_two_node.run_modes(args) == ["flat", "two-level+group-lim", "head-affine"]
    args = moe_two_node.parse_args(["--modes", "head-affine,two-level+group-lim", "--skew", "0.5", "--debug-skew"])
    assert moe_two_node.run_modes(args) == ["flat", "head-affine"]  # debug routing excludes the group limit
    with pytest.raises(SystemExit, match="unknown mode"):
        moe_two_node.run_modes(moe_two_node.parse_args(["--modes", "head"]))
    assert moe_two_node.node_traffic([1.0, 2.0, 3.0, 3.0], 2) == ([3.0, 6.0], 2.0)  # per NIC or per rank
    assert moe_two_node.node_traffic([4.0, 4.0], 1) == ([4.0, 4.0], 1.0)
    assert moe_two_node.node_traffic([0.0, 4.0], 1)[1] == float("inf")


def test_summarize_adds_the_node_table(tmp_path):
    lines = []
    for mode, link, rows, x in (("flat", 8.0, [600, 200], 1.0), ("head-affine", 4.2, [256, 256], 0.6)):
        row = dict(rate="100mbit", rails=2, shape="mhmoe", mode=mode, step_ms=100 * x, x_flat=x, link_mb=link,
                   rail_mb=[link / 4] * 4, formula_mb=link, picked="flat", skew=0.5, skew_kind="hot",
                   node_tx_mb=[link / 2] * 2, node_dispatch_rows=rows, node_ratio=max(rows) / min(rows))
        lines.append("JSON " + json.dumps(row))
    p = tmp_path / "run.txt"
    p.write_text("\n".join(lines) + "\n")
    text = moe_two_node.summarize([str(p)])
    assert "| 100mbit | 2 | hot 0.5 | head-affine | 0.60 | 4.20 | 0.53 | 2.10 2.10 | 256 256 | 1.00 |" in text
    assert "| 100mbit | 2 | hot 0.5 | flat | 1.00 | 8.00 | 1.00 | 4.00 4.00 | 600 200 | 3.00 |" in text
    # lines without the node fields (earlier runs) give the first table alone
    old = tmp_path / "old.txt"
    old.write_text("JSON " + json.dumps(dict(rate="1gbit", rails=1, shape="mhmoe", mode="flat", step_ms=1.0,
                                                x_flat=1.0, link_mb=1.0, rail_mb=[0.5, 0.5], formula_mb=1.0,
                                                picked="flat")) + "\n")
    assert "node max/min" not in moe_two_node.summarize([str(old)])
