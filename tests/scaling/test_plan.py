"""Placement arithmetic (EP, nodes, experts per rank) for 8 -> 256 experts, and the run list."""
import pytest

from megatron_mhmoe.scaling.plan import build_plan, memory_per_rank, place, run_name
from megatron_mhmoe.scaling.spec import load_sweep

# (experts) -> (nodes, EP, experts per rank) with 8 ranks per node and 8 experts per rank as the target.
EXPECTED = {
    1: {8: (1, 1, 8), 16: (1, 2, 8), 32: (1, 4, 8), 64: (1, 8, 8), 128: (1, 8, 16), 256: (1, 8, 32)},
    2: {8: (1, 1, 8), 16: (1, 2, 8), 32: (1, 4, 8), 64: (1, 8, 8), 128: (2, 16, 8), 256: (2, 16, 16)},
    4: {8: (1, 1, 8), 16: (1, 2, 8), 32: (1, 4, 8), 64: (1, 8, 8), 128: (2, 16, 8), 256: (4, 32, 8)},
    32: {8: (1, 1, 8), 16: (1, 2, 8), 32: (1, 4, 8), 64: (1, 8, 8), 128: (2, 16, 8), 256: (4, 32, 8)},
}


@pytest.mark.parametrize("nodes", sorted(EXPECTED))
def test_place_8_to_256(nodes):
    for E, (n, ep, per_rank) in EXPECTED[nodes].items():
        p = place(E, nodes, 8, 8)
        assert (p.nodes, p.ep, p.experts_per_rank) == (n, ep, per_rank), (nodes, E, p)
        assert p.world == n * 8 and E % p.ep == 0 and p.world % p.ep == 0 and p.ep * p.experts_per_rank == E


def test_place_uneven_expert_counts_and_dense():
    # The FLOPs-matched E' are not powers of two: EP is the largest common divisor not above the target.
    p = place(40, 32, 8, 8)                       # target 5 -> 1 node, divisors of 40 and 8 up to 5 -> 4
    assert (p.nodes, p.world, p.ep, p.experts_per_rank) == (1, 8, 4, 10) and "largest divisor" in p.note
    p = place(96, 32, 8, 8)                       # target 12 -> 2 nodes (16 ranks), EP 8 -> 12 per rank
    assert (p.nodes, p.world, p.ep, p.experts_per_rank) == (2, 16, 8, 12)
    assert place(0, 4, 8, 8) == place(0, 1, 8, 1)  # dense: one node, EP 1
    assert place(0, 4, 8, 8).ep == 1
    assert place(256, 4, 8, 8, max_ep=8).ep == 8
    assert place(64, 1, 1, 64) .ep == 1           # the CPU mini sweep: one process holds all experts
    with pytest.raises(ValueError, match="ranks_per_node=0"):
        place(8, 1, 0, 8)


def test_memory_estimate_shrinks_with_ep():
    spec, base = load_sweep("paper_scaling")
    runs = {r.name: r for r in build_plan(spec, base)}
    m = runs["smoe-E256-s1"].model
    one, many = memory_per_rank(m, 1, 8), memory_per_rank(m, 32, 32)
    assert many["params_local"] < one["params_local"] / 10
    assert many["total_gb"] < one["total_gb"]


def test_paper_scaling_plan():
    spec, base = load_sweep("paper_scaling")
    runs = build_plan(spec, base)
    assert len(runs) == 3 + 6 * 2 * 3                  # dense x seeds + E x {smoe, mhmoe} x seeds
    assert len({r.name for r in runs}) == len(runs)
    by = {r.name: r for r in runs}
    assert by["mhmoe-h4-params-E256-s2"].placement.nodes == 4 and by["mhmoe-h4-params-E256-s2"].placement.ep == 32
    assert by["dense-s3"].model.moe is None
    assert {"paper_scaling", "mhmoe", "E256", "h4", "match-params", "seed2"} <= set(by["mhmoe-h4-params-E256-s2"].tags)
    # a hostfile with 2 nodes shrinks the big runs onto them
    small = {r.name: r for r in build_plan(spec, base, nodes=2, ranks_per_node=8)}
    assert (small["smoe-E256-s1"].placement.nodes, small["smoe-E256-s1"].placement.ep) == (2, 16)


def test_activation_probe_runs_no_and_weak_balance_loss():
    spec, base = load_sweep("activation_probe", [])
    names = sorted(r.name for r in build_plan(spec, base))
    assert names == sorted(f"{k}-E64-aux_loss_coef{c}-s{s}" for k in ("smoe", "mhmoe-h4-params")
                           for c in ("0.0", "0.001") for s in (1, 2))


def test_vary_axis_names_and_dense_dedup():
    spec, base = load_sweep("activation_probe", ["sweep.kinds=[dense, smoe, mhmoe]",
                                                 "sweep.vary={model.moe.aux_loss_coef: [0.0, 0.001]}"])
    runs = build_plan(spec, base)
    names = [r.name for r in runs]
    assert "smoe-E64-aux_loss_coef0.0-s1" in names and "mhmoe-h4-params-E64-aux_loss_coef0.001-s2" in names
    assert [n for n in names if n.startswith("dense")] == ["dense-s1", "dense-s2"]  # no moe axis for dense
    assert run_name("mhmoe", 32, 2, "flops", 3, {}) == "mhmoe-h2-flops-E32-s3"


BALANCING = {"micro": {"model.moe.aux_loss_coef": 0.01},
             "global": {"model.moe.aux_loss_coef": 0.0, "model.moe.global_aux_loss_coef": 0.01},
             "aux-free": {"model.moe.aux_loss_coef": 0.0, "model.moe.bias_update_rate": 0.001},
             "quantile": {"model.moe.aux_loss_coef": 0.0, "model.moe.quantile_balancing": True},
             "none": {"model.moe.aux_loss_coef": 0.0}}


def test_balancing_probe_plan_has_30_runs_with_the_variants_overrides(tmp_path):
    from megatron_mhmoe.scaling.runner import run_config
    spec, base = load_sweep("balancing_probe", [])
    assert spec.variants == BALANCING and spec.top_k == 2 and spec.experts == [64]
    runs = build_plan(spec, base)
    assert len(runs) == 30 and len({r.name for r in runs}) == 30
    assert sorted(r.name for r in runs) == sorted(f"{k}-E64-{v}-s{s}" for k in ("smoe", "mhmoe-h4-params")
                                                  for v in BALANCING for s in (1, 2, 3))
    for r in runs:
        assert r.overrides == BALANCING[r.variant] and r.vary == {} and f"variant={r.variant}" in r.tags
        assert r.model.moe.num_experts == 64 and r.model.moe.top_k == 2 and r.model.moe.route_groups == 8
        assert r.model.moe.num_heads == (4 if r.kind == "mhmoe" else 1)
        cfg = run_config(r, spec, base, str(tmp_path))                   # what train.py gets
        moe = cfg["model"]["moe"]
        # several micro-batches per step: else the global batch is the micro-batch (same loss as 'micro')
        assert (cfg["train"]["micro_batch_size"], cfg["train"]["grad_accum_steps"]) == (2, 4)
        expect = {"aux_loss_coef": 0.0, "global_aux_loss_coef": 0.0, "bias_update_rate": 0.0,
                  "quantile_balancing": False}
        expect.update({k.split(".")[-1]: v for k, v in BALANCING[r.variant].items()})
        assert {k: moe[k] for k in expect} == expect, r.name
        assert moe["route_groups"] == 8
    # seeds of one (kind, variant) share a group key; variants do not
    keys = {r.group_key for r in runs}
    assert len(keys) == 10


def test_variants_cross_vary_dense_drops_moe_keys_and_validation():
    from megatron_mhmoe.scaling.spec import sweep_from_dict
    runs = build_plan(*load_sweep("activation_probe", [
        "sweep.kinds=[dense, smoe]", "sweep.seeds=[1]", "sweep.vary={train.lr: [0.001, 0.002]}",
        "sweep.variants={a: {model.moe.aux_loss_coef: 0.0}, b: {model.moe.aux_loss_coef: 0.1, train.min_lr: 0.0}}"]))
    names = [r.name for r in runs]
    # dense: variant a has no key left (runs unnamed, once per vary point), b keeps train.min_lr
    assert names == ["dense-lr0.001-s1", "dense-lr0.002-s1", "dense-b-lr0.001-s1", "dense-b-lr0.002-s1",
                     "smoe-E64-a-lr0.001-s1", "smoe-E64-a-lr0.002-s1", "smoe-E64-b-lr0.001-s1",
                     "smoe-E64-b-lr0.002-s1"]
    by = {r.name: r for r in runs}
    assert by["dense-b-lr0.001-s1"].overrides == {"train.min_lr": 0.0} and by["dense-lr0.001-s1"].variant == ""
    assert run_name("smoe", 8, 1, "", 2, {}, "none") == "smoe-E8-none-s2"
    # no variants: one unnamed variant, names as before
    assert [r.name for r in build_plan(*load_sweep("activation_probe", ["sweep.seeds=[1]"]))][0] == \
        "smoe-E64-aux_loss_coef0.0-s1"
    base = {"base_config": "cpu_mini_sweep.yaml"}
    for variants, msg in (({"x": {"model.moe.aux_loss_coef": 0.0}}, "also varies"),
                          ({"a/b": {"train.lr": 1.0}}, "run names"), ({"a": {}}, "non-empty"),
                          ({"a": {"moe.aux_loss_coef": 0.0}}, "must start with")):
        with pytest.raises(ValueError, match=msg):
            sweep_from_dict({**base, "sweep": {"vary": {"model.moe.aux_loss_coef": [0.0]}, "variants": variants}})
