"""The MH-MoE layer under TP x EP (x DP) equals the single-process layer with the same weights.

For each layout every rank builds the single-process layer (same seed, so the same full weights), shards
it into its local layer, and runs its share of a global batch X (DP replicas x seq x batch x d). The
reference runs the single-process layer once per DP replica (a replica is one routing group: capacity and
balance loss are per replica), with loss = mean over replicas of sum(Y * G) + aux + z. Compared: each
rank's output for its replica, the aux and z losses, and every gradient (reduced with
parallel.grads.reduce_gradients, gathered to full tensors).

Tolerance: fp32, atol 2e-5 / rtol 1e-4. The parallel path sums in another order (all-to-all regroups rows,
gradients are all-reduced), so bit equality is not expected; routing decisions are identical (checked
through the drop counts).
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.grads import reduce_gradients
from megatron_mhmoe.parallel.params import gather_full_grads, shard_full_state_dict
from tests.distributed import run_workers

ATOL, RTOL = 2e-5, 1e-4
SEQ, BATCH, D = 8, 2, 32
AUX, ZC = 0.01, 0.001

# (world, tp, ep) layouts of the issue: world 1, 2 and 4, EP > DP included ("parallel folding").
LAYOUTS = {1: [(1, 1)], 2: [(1, 1), (1, 2), (2, 1), (2, 2)], 4: [(1, 4), (2, 2), (2, 4)]}
VARIANTS = list(itertools.product([False, True], [1, 2], [1, 4], [0.0, 1.0]))  # (sp, k, h, cf)


def make_config(k: int, h: int, cf: float, num_experts: int = 8, gate: str = "xmoe") -> ModelConfig:
    return ModelConfig(hidden_size=D, num_attention_heads=4, ffn_hidden_size=64, num_layers=2, moe=MoEConfig(
        num_experts=num_experts, top_k=k, num_heads=h, head_projection=h > 1, expert_hidden_size=16,
        capacity_factor=cf, gate=gate, aux_loss_coef=AUX, z_loss_coef=ZC))


def reference(cfg: ModelConfig, X: torch.Tensor, G: torch.Tensor) -> dict:
    """Single-process layer, one call per DP replica."""
    layer = MHMoELayer(cfg, ParallelContext.single_process())
    total, outs, stats = 0.0, [], []
    for r in range(X.shape[0]):
        y, st = layer(X[r])
        total = total + (y * G[r]).sum() + AUX * st.aux_loss + ZC * st.z_loss
        outs.append(y.detach())
        stats.append(st)
    (total / X.shape[0]).backward()
    return dict(state=layer.state_dict(), outs=outs, stats=stats,
                grads={n: p.grad.clone() for n, p in layer.named_parameters()})


def run_case(ctx: ParallelContext, cfg: ModelConfig, seed: int) -> dict:
    torch.manual_seed(seed)
    dp = ctx.dp_size
    X = torch.randn(dp, SEQ, BATCH, D)
    G = torch.randn(dp, SEQ, BATCH, D)
    ref = reference(cfg, X, G)
    layer = MHMoELayer(cfg, ctx)
    layer.load_state_dict(shard_full_state_dict(layer, ref["state"], ctx))
    x = X[ctx.dp_rank]
    if ctx.sequence_parallel:
        x = x.chunk(ctx.tp_size, dim=0)[ctx.tp_rank]  # (s/tp, b, d) this rank's sequence shard
    y, st = layer(x)
    if ctx.sequence_parallel:
        y = comm.gather_from_region(y, 0, ctx.tp_group)  # (s, b, d), gradient split back
    loss = (y * G[ctx.dp_rank]).sum() + AUX * st.aux_loss + ZC * st.z_loss
    loss.backward()
    reduce_gradients(layer, ctx)
    grads = gather_full_grads(layer, ctx)
    rst = ref["stats"][ctx.dp_rank]
    return dict(
        out_err=(y.detach() - ref["outs"][ctx.dp_rank]).abs().max().item(),
        out_ok=torch.allclose(y.detach(), ref["outs"][ctx.dp_rank], atol=ATOL, rtol=RTOL),
        aux=(st.aux_loss.item(), rst.aux_loss.item()), z=(st.z_loss.item(), rst.z_loss.item()),
        dropped=(st.dropped, rst.dropped), kept_equal=torch.equal(st.kept, rst.kept),
        div_equal=torch.equal(st.divergence, rst.divergence),
        grad_bad=[n for n, g in grads.items() if not torch.allclose(g, ref["grads"][n], atol=ATOL, rtol=RTOL)],
        grad_err=max((g - ref["grads"][n]).abs().max().item() for n, g in grads.items()),
    )


def worker(rank: int, world: int) -> dict:
    results = {}
    for (tp, ep), (sp, k, h, cf) in itertools.product(LAYOUTS[world], VARIANTS):
        if sp and tp == 1:
            continue
        ctx = ParallelContext.from_world(tp, ep, sequence_parallel=sp)
        results[(tp, ep, sp, k, h, cf)] = run_case(ctx, make_config(k, h, cf), seed=hash((tp, ep, k, h)) % 1000)
    # An expert that receives no tokens: it still joins every collective and gets an exact zero gradient.
    ctx = ParallelContext.from_world(1, world)
    cfg = make_config(1, 1, 0.0, gate="softmax")
    layer = MHMoELayer(cfg, ctx)
    with torch.no_grad():
        layer.router.proj.weight[-1].fill_(0.0)
        layer.router.proj.weight[-1, 0] = -1e4  # logit of the last expert is hugely negative for x0 > 0
    x = torch.rand(SEQ, BATCH, D) + 0.1
    y, st = layer(x)
    y.sum().backward()
    reduce_gradients(layer, ctx)
    grads = gather_full_grads(layer, ctx)
    results["empty_expert"] = dict(selections=st.selections.tolist(),
                                   last_w1=grads["experts.w1"][-1].abs().max().item(),
                                   others_w1=grads["experts.w1"][:-1].abs().max().item())
    if world > 1:
        # Every choice on rank 0's experts: there all rows stay home and nothing arrives; the other ranks keep
        # none and receive nothing (the flat path's empty exchanges and empty expert calls).
        cfg = make_config(2, 4, 0.0)
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, debug_routing="skew", debug_skew_fraction=1.0))
        results["all_to_rank0"] = run_case(ParallelContext.from_world(1, world), cfg, seed=3)
    if world == 4:
        # 256 experts over EP=4 run and equal the reference.
        ctx = ParallelContext.from_world(1, 4)
        results["e256"] = run_case(ctx, make_config(2, 4, 1.0, num_experts=256), seed=7)
    return results


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"world{w}")
def world_results(request):
    world = request.param
    return world, run_workers(worker, world, timeout_s=420)


def _check(case, res, rank):
    where = f"case (tp, ep, sp, k, h, cf)={case} rank {rank}"
    assert res["out_ok"], f"{where}: output differs by {res['out_err']:.3g}"
    assert res["aux"][0] == pytest.approx(res["aux"][1], rel=1e-5, abs=1e-6), where
    assert res["z"][0] == pytest.approx(res["z"][1], rel=1e-5, abs=1e-6), where
    assert res["dropped"][0] == res["dropped"][1], f"{where}: dropped {res['dropped']}"
    assert res["kept_equal"] and res["div_equal"], where
    assert not res["grad_bad"], f"{where}: gradients differ ({res['grad_err']:.3g}) for {res['grad_bad']}"


def test_layer_equals_single_process(world_results):
    world, per_rank = world_results
    n_cases = 0
    for rank, results in enumerate(per_rank):
        for case, res in results.items():
            if isinstance(case, tuple):
                _check(case, res, rank)
                n_cases += 1
    assert n_cases >= world * 8  # every layout ran its variants


def test_capacity_actually_drops(world_results):
    """cf=1.0 must drop something in at least one case, or the capacity comparison proved nothing."""
    _, per_rank = world_results
    drops = [res["dropped"][1] for results in per_rank for case, res in results.items()
             if isinstance(case, tuple) and case[5] > 0]
    assert max(drops) > 0


def test_empty_expert_gets_zero_gradient(world_results):
    _, per_rank = world_results
    for results in per_rank:
        res = results["empty_expert"]
        assert res["selections"][-1] == 0, "the forced routing should starve the last expert"
        assert res["last_w1"] == 0.0
        assert res["others_w1"] > 0.0


def test_all_rows_to_one_rank_equals_single_process(world_results):
    world, per_rank = world_results
    if world == 1:
        pytest.skip("needs EP > 1")
    for rank, results in enumerate(per_rank):
        _check(("all_to_rank0",), results["all_to_rank0"], rank)


def test_256_experts_ep4(world_results):
    world, per_rank = world_results
    if world != 4:
        pytest.skip("runs in the world-4 group")
    for rank, results in enumerate(per_rank):
        _check(("e256",), results["e256"], rank)
