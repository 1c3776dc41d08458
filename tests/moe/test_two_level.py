"""The two-level expert-parallel all-to-all (moe/two_level.py) against the flat one (dispatcher.py), at
world 4 as 2 nodes x 2 ranks (gloo on loopback; model.moe.ep_ranks_per_node=2 says where the nodes are).

1. Same outputs, input and parameter gradients and drop counts as the flat path, with and without
   capacity, SMoE (h=1) and MH-MoE (h=4), one chunk and pipelined chunks (a2a_chunks > 1).
   Exchanges per step: flat 5, two-level 1 + 12 per chunk (forward and backward).
2. Inter-node bytes of one fwd+bwd step, measured by wrapping dist.all_to_all_single (every exchange of
   both paths, forward and backward, asynchronous ones included), equal the dispatcher's count and
   two_level.internode_formula evaluated on packet counts derived here from every rank's routing; they
   never exceed the flat path's (whose measured bytes equal its own count too).
3. ep_recv_budget: a rank over it makes every rank raise the same error naming the setting (both paths);
   a budget that fits changes nothing.
Tolerance: fp32, atol 2e-5 / rtol 1e-4 (the paths add the same terms in another order).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe import two_level
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.context import ParallelContext
from tests.distributed import run_workers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from a2a_meter import A2AMeter  # noqa: E402

ATOL, RTOL = 2e-5, 1e-4
D, E, TOKENS, PER_NODE = 32, 8, 12, 2
# (h, k, capacity factor, chunks)
CASES = [(4, 2, 0.0, 1), (4, 2, 1.0, 1), (1, 1, 0.0, 1), (1, 2, 1.0, 1), (4, 2, 0.0, 3), (4, 2, 1.0, 2)]


def make_layer(ctx, h, k, cf, chunks, budget=0):
    cfg = ModelConfig(hidden_size=D, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=k, num_heads=h, head_projection=h > 1, expert_hidden_size=16, capacity_factor=cf,
        gate="softmax", ep_ranks_per_node=PER_NODE, a2a_chunks=chunks, ep_recv_budget=budget))
    return MHMoELayer(cfg, ctx)


def step(layer, x, flat: bool):
    layer.dispatcher.force_flat = flat
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with A2AMeter(per_node=PER_NODE) as meter:
        y, st = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return dict(y=y.detach(), gx=x.grad, grads=grads, dropped=st.dropped, meter=meter.bytes_off_node, calls=meter.calls,
                counted=layer.dispatcher.profile.internode_bytes, sent=layer.dispatcher.profile.rows_sent)


def packets(all_routes, layout: two_level.NodeLayout, me: int, E_node: int):
    """Packets rank `me` sends to / receives from other nodes in step 3, from every rank's routing:
    one per (sub-token, remote node) holding a kept choice, via gateways gw(a, b) -> gw(b, a)."""
    per = {}  # (source rank, destination node) -> packets
    for s, (experts, keep) in enumerate(all_routes):
        S, k = experts.shape
        kept = keep.view(k, S).t() if keep is not None else torch.ones(S, k, dtype=torch.bool)
        for i in range(S):
            for b in {int(e) // E_node for e, ok in zip(experts[i], kept[i]) if ok}:
                per[(s, b)] = per.get((s, b), 0) + 1
    out = inn = 0
    for (s, b), n in per.items():
        a = layout.node(s)
        if a == b:
            continue
        if layout.gateway(a, b) == me:
            out += n
        if layout.gateway(b, a) == me:
            inn += n
    return out, inn


def worker(rank: int, world: int) -> dict:
    ctx = ParallelContext.from_world(1, world)
    res = {}
    for h, k, cf, chunks in CASES:
        layer = make_layer(ctx, h, k, cf, chunks)
        assert layer.dispatcher.layout is not None
        torch.manual_seed(100 + rank)
        x = torch.randn(TOKENS, D)
        flat, two = step(layer, x, True), step(layer, x, False)
        # The routing of this forward (same on both paths), from every rank, for the byte formula.
        rec = {}
        orig = layer.dispatcher.dispatch

        def spy(x_sub, record, run_experts):
            rec["r"] = (record.experts.clone(), None if record.keep is None else record.keep.clone())
            return orig(x_sub, record, run_experts)
        layer.dispatcher.dispatch = spy
        with torch.no_grad():
            layer(x)
        layer.dispatcher.dispatch = orig
        routes = comm.all_gather_object(rec["r"], ctx.ep_group)
        E_node = E // world * PER_NODE
        # A packet belongs to one chunk (chunks split the sub-tokens): the whole forward's packets count.
        p_out, p_in = packets(routes, layer.dispatcher.layout, ctx.ep_rank, E_node)
        formula = two_level.internode_formula(p_out, p_in, D // h, k, 4, 1, world, PER_NODE, chunks)
        res[(h, k, cf, chunks)] = dict(
            out_ok=torch.allclose(two["y"], flat["y"], atol=ATOL, rtol=RTOL),
            out_err=(two["y"] - flat["y"]).abs().max().item(),
            gx_ok=torch.allclose(two["gx"], flat["gx"], atol=ATOL, rtol=RTOL),
            grad_bad=[n for n, g in flat["grads"].items()
                      if not torch.allclose(two["grads"][n], g, atol=ATOL, rtol=RTOL)],
            same_grad_set=set(flat["grads"]) == set(two["grads"]),
            dropped=(two["dropped"], flat["dropped"]), sent=(two["sent"], flat["sent"]),
            two_meter=two["meter"], two_counted=two["counted"], flat_meter=flat["meter"],
            flat_counted=flat["counted"], formula=formula, calls=(two["calls"], flat["calls"]))
    # 3. A budget below what the busiest rank receives: every rank raises, naming the setting.
    for flat in (True, False):
        layer = make_layer(ctx, 4, 2, 0.0, 1, budget=TOKENS * 4 * 2 - 1)
        layer.dispatcher.force_flat = flat
        torch.manual_seed(100 + rank)
        try:
            layer(torch.randn(TOKENS, D))
            res[("budget", flat)] = None
        except RuntimeError as err:
            res[("budget", flat)] = str(err)
        fits = make_layer(ctx, 4, 2, 0.0, 1, budget=TOKENS * 4 * 2 * world)
        fits.dispatcher.force_flat = flat
        y, _ = fits(torch.randn(TOKENS, D))
        res[("budget_fits", flat)] = tuple(y.shape)
    return res


@pytest.fixture(scope="module")
def results():
    return run_workers(worker, 4, timeout_s=300)


def test_two_level_equals_flat(results):
    for rank, res in enumerate(results):
        for case in CASES:
            r, where = res[case], f"(h, k, cf, chunks)={case} rank {rank}"
            assert r["out_ok"], f"{where}: output differs by {r['out_err']:.3g}"
            assert r["gx_ok"], f"{where}: input gradient differs"
            assert r["same_grad_set"] and not r["grad_bad"], f"{where}: gradients differ for {r['grad_bad']}"
            assert r["dropped"][0] == r["dropped"][1] and r["sent"][0] == r["sent"][1], where
            # Exchanges per fwd+bwd step: flat 3 + 2 backward; two-level one traffic exchange, then per chunk
            # 6 (steps 2-4 and their 3 returns) + 6 backward.
            assert r["calls"] == (1 + 12 * case[3], 5), f"{where}: all-to-all calls {r['calls']}"
    assert any(res[c]["dropped"][1] > 0 for res in results for c in CASES if c[2] > 0), "capacity should drop"


def test_internode_bytes_equal_formula_and_not_above_flat(results):
    for rank, res in enumerate(results):
        for case in CASES:
            r, where = res[case], f"(h, k, cf, chunks)={case} rank {rank}"
            assert r["two_meter"] == r["two_counted"], f"{where}: measured {r['two_meter']} != counted"
            assert r["flat_meter"] == r["flat_counted"], f"{where}: flat measured {r['flat_meter']} != counted"
            assert r["two_meter"] == r["formula"], f"{where}: measured {r['two_meter']} != {r['formula']}"
    for case in CASES:
        if case[3] == 1 and case[1] > 1:  # k > 1 over 2 nodes: rows with two choices on a node cross once
            two = sum(res[case]["two_meter"] for res in results)
            flat = sum(res[case]["flat_meter"] for res in results)
            assert two <= flat, f"{case}: two-level {two} > flat {flat} inter-node bytes"


def test_receive_budget_error_on_every_rank(results):
    for flat in (True, False):
        msgs = [res[("budget", flat)] for res in results]
        assert all(m is not None and "model.moe.ep_recv_budget" in m for m in msgs), msgs
        assert len({m.split("(this rank")[0] for m in msgs}) == 1, msgs  # the same verdict everywhere
        assert all(res[("budget_fits", flat)] == (TOKENS, D) for res in results)
