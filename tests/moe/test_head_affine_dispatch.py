"""The head-affine path (moe/head_affine_dispatch.py) against the flat one (its reference), gloo on loopback.

One spawned job of world 8 holds both layouts: EP = 8 as 2 nodes x 4 ranks, and EP = 4 as 2 nodes x 2
ranks (two EP groups of 4 in the world of 8), every case inside it (h = 2 and 4, G = nodes and 2 x nodes,
with and without capacity, 1 and 2 chunks).

1. Same outputs, input and parameter gradients, drop counts, kept rows sent and rows each rank's experts
   receive as the flat path on the same
   (head-affine) routing. Tolerance: fp32, atol 2e-5 / rtol 1e-4 (the paths add the same terms in another
   order).
2. Fixed cross-node exchange: no integer (count) exchange leaves a node, no row leaves its rail, and each
   rank's inter-node bytes, measured by wrapping dist.all_to_all_single, equal the dispatcher's count and
   the fixed formula 2 x 2 S (N-1)/N (2 d_sub + k + c) itemsize, whatever the routing: every rank of every
   node the same, also under skewed debug routing. Exchanges per fwd+bwd step: 9 per chunk.
3. ep_dispatch: 'flat' takes the flat path; 'auto' takes the head-affine one on a slow NIC.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe.two_level import id_columns
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.parallel.context import ParallelContext
from tests.distributed import run_workers
from tests.moe.path_step import step

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from a2a_meter import A2AMeter  # noqa: E402

ATOL, RTOL = 2e-5, 1e-4
D_MODEL, E, TOKENS = 32, 16, 12
# (EP, ranks per node, h, k, capacity factor, chunks, G)
CASES = [(4, 2, 4, 2, 0.0, 1, 2), (4, 2, 4, 2, 1.0, 2, 4), (4, 2, 2, 1, 1.0, 1, 2),
         (8, 4, 4, 2, 1.0, 1, 2), (8, 4, 2, 2, 0.0, 2, 2)]


def make_layer(ctx, per_node, h, k, cf, chunks, G, debug="", mode="two_level", nic_gbps=400.0):
    cfg = ModelConfig(hidden_size=D_MODEL, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=k, num_heads=h, head_projection=h > 1, expert_hidden_size=16, capacity_factor=cf,
        gate="softmax", ep_ranks_per_node=per_node, a2a_chunks=chunks, head_groups=G, debug_routing=debug,
        ep_dispatch=mode, ep_nic_gbps=nic_gbps))
    torch.manual_seed(7)
    return MHMoELayer(cfg, ctx)


def worker(rank: int, world: int, cases: list) -> dict:
    ctxs = {ep: ParallelContext.from_world(1, ep) for ep in (4, 8)}
    res = {}
    for case in cases:
        ep, per_node, h, k, cf, chunks, G = case
        ctx = ctxs[ep]
        layer = make_layer(ctx, per_node, h, k, cf, chunks, G)
        torch.manual_seed(100 + rank)
        x = torch.randn(TOKENS, D_MODEL)
        flat, fixed = step(layer, x, True, per_node), step(layer, x, False, per_node)
        res[case] = dict(
            out_err=(fixed["y"] - flat["y"]).abs().max().item(),
            out_ok=torch.allclose(fixed["y"], flat["y"], atol=ATOL, rtol=RTOL),
            gx_ok=torch.allclose(fixed["gx"], flat["gx"], atol=ATOL, rtol=RTOL),
            grad_bad=[n for n, g in flat["grads"].items()
                      if n not in fixed["grads"] or not torch.allclose(fixed["grads"][n], g, atol=ATOL, rtol=RTOL)],
            same_grad_set=set(flat["grads"]) == set(fixed["grads"]),
            dropped=(fixed["dropped"], flat["dropped"]), sent=(fixed["sent"], flat["sent"]),
            received=(fixed["received"], flat["received"]),
            meter=fixed["meter"].bytes_off_node, counted=fixed["counted"], calls=fixed["meter"].calls,
            off_rail=fixed["meter"].bytes_off_rail,
            ints_off_node=sum(c["off_node"] for c in fixed["meter"].per_call if not c["floating"]))
    # Skewed routing (half the sub-tokens on their group's first expert): every rank's NIC the same bytes.
    layer = make_layer(ctxs[4], 2, 4, 2, 0.0, 1, 2, debug="skew")
    torch.manual_seed(100 + rank)
    res["skew"] = step(layer, torch.randn(TOKENS, D_MODEL), False, 2)["meter"].bytes_off_node
    # ep_dispatch picks the path: exchanges per forward (flat 3; head-affine 5 per chunk).
    x = torch.randn(TOKENS, D_MODEL)
    for mode, gbps in (("flat", 400.0), ("auto", 1e-4)):
        layer = make_layer(ctxs[4], 2, 4, 2, 0.0, 1, 2, mode=mode, nic_gbps=gbps)
        with A2AMeter(per_node=2) as meter, torch.no_grad():
            layer(x)
        res[("mode", mode)] = meter.calls
    return res


@pytest.fixture(scope="module")
def results():
    return run_workers(worker, 8, CASES, timeout_s=400)


def formula(ep, per_node, h, k):
    """Inter-node bytes one rank sends per fwd+bwd step: S (N-1)/N packets out (d_sub + k + c values) and
    as many partial rows (d_sub) for the packets it received; the backward sends their gradients the other
    way round, so 2 S (N-1)/N (2 d_sub + k + c) values."""
    N, S, d_sub = ep // per_node, TOKENS * h, D_MODEL // h
    c = id_columns(k, 1, 4)
    return 2 * S * (N - 1) // N * (2 * d_sub + k + c) * 4


def test_head_affine_path_equals_flat(results):
    for rank, res in enumerate(results):
        for case in CASES:
            r = res[case]
            where = f"(EP, per_node, h, k, cf, chunks, G)={case} rank {rank}"
            assert r["out_ok"], f"{where}: output differs by {r['out_err']:.3g}"
            assert r["gx_ok"], f"{where}: input gradient differs"
            assert r["same_grad_set"] and not r["grad_bad"], f"{where}: gradients differ for {r['grad_bad']}"
            assert r["dropped"][0] == r["dropped"][1] and r["sent"][0] == r["sent"][1], where
            # each rank's experts get the rows the flat path gives them (no dropped choice computed)
            assert r["received"][0] == r["received"][1], (where, r["received"])
            assert r["calls"] == 9 * case[5], f"{where}: {r['calls']} exchanges, not the head-affine path's"
    assert any(res[c]["dropped"][1] > 0 for res in results for c in CASES if c[4] > 0), "capacity should drop"


def test_cross_node_exchange_is_fixed(results):
    for rank, res in enumerate(results):
        for case in CASES:
            r = res[case]
            where = f"(EP, per_node, h, k, cf, chunks, G)={case} rank {rank}"
            assert r["ints_off_node"] == 0, f"{where}: {r['ints_off_node']} bytes of counts cross nodes"
            assert r["off_rail"] == 0, f"{where}: {r['off_rail']} bytes to another node off this rank's rail"
            assert r["meter"] == r["counted"] == formula(*case[:4]), (where, r["meter"], r["counted"])
    skew = [res["skew"] for res in results]
    assert skew == [formula(4, 2, 4, 2)] * 8, skew


def test_ep_dispatch_setting(results):
    for res in results:
        assert (res[("mode", "flat")], res[("mode", "auto")]) == (3, 5)
