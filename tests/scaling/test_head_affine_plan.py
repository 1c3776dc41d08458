"""Sweep presets can enable head-affine placement (sweep.head_groups, or a variant's model.moe.head_groups):
the plan resolves 'nodes' per run from its EP group, writes G into the MH-MoE runs' configs only, prints the
placement, and refuses a G that does not fit with the arithmetic."""
import pytest

from megatron_mhmoe.scaling.plan import build_plan, format_plan
from megatron_mhmoe.scaling.runner import run_config
from megatron_mhmoe.scaling.spec import load_sweep


def test_paper_sweep_with_nodes_placement(tmp_path):
    spec, base = load_sweep("paper_scaling", ["--sweep.head_groups=nodes", "--sweep.seeds=[1]"])
    runs = {r.name: r for r in build_plan(spec, base)}
    # 8 ranks per node, 8 experts per rank: E=256 -> EP 32 on 4 nodes, E=128 -> EP 16 on 2, E<=64 one node.
    for E, G in ((64, 1), (128, 2), (256, 4)):
        mh, sm = runs[f"mhmoe-h4-params-E{E}-s1"], runs[f"smoe-E{E}-s1"]
        assert mh.model.moe.head_groups == (G if G > 1 else 0), (E, mh.model.moe.head_groups)
        assert sm.model.moe.head_groups == 0 and not sm.head_affine  # one head: the shared pool
        assert run_config(mh, spec, base, str(tmp_path))["model"]["moe"]["head_groups"] == mh.model.moe.head_groups
    text = format_plan(list(runs.values()), 64)
    assert "head-affine placement (model.moe.head_groups):" in text
    assert ("mhmoe-h4-params-E256-s1: G=4: head j routes among experts of group j mod 4 (64 each); EP 32 = 4 nodes "
            "x 8: group g on node g // 1, so each token sends h/N = 1 sub-tokens to every node") in text


def test_variant_and_misfit():
    spec, base = load_sweep("head_affine_probe", ["--sweep.seeds=[1]"])
    runs = {r.name: r for r in build_plan(spec, base)}
    assert "G=4" in runs["mhmoe-h4-params-E64-head-G4-s1"].head_affine
    assert not runs["mhmoe-h4-params-E64-shared-s1"].head_affine
    assert "EP 1 within one node: routing only" in format_plan(list(runs.values()), 64)
    # G = 3 divides neither h = 4 nor E = 64: refused with the run and the arithmetic
    spec, base = load_sweep("paper_scaling", ["--sweep.head_groups=3", "--sweep.seeds=[1]", "--sweep.kinds=[mhmoe]"])
    with pytest.raises(ValueError, match=r"run mhmoe-h4-params-E8-s1: .*do not divide num_heads=4 \(4 % 3 = 1\)"):
        build_plan(spec, base)
    # G = 2 on the E=256 runs' 4 nodes: a group would span two nodes
    spec, base = load_sweep("paper_scaling", ["--sweep.head_groups=2", "--sweep.seeds=[1]", "--sweep.kinds=[mhmoe]"])
    with pytest.raises(ValueError, match=r"E256-s1: .*needs G a multiple of the nodes \(2 % 4 = 2\)"):
        build_plan(spec, base)
    with pytest.raises(ValueError, match="sweep.head_groups='node' must be"):
        load_sweep("paper_scaling", ["--sweep.head_groups=node"])
