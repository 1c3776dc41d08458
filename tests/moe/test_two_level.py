"""The rail-aligned two-level expert-parallel all-to-all (moe/two_level.py) against the flat one
(dispatcher.py), gloo on loopback, nodes declared by model.moe.ep_ranks_per_node: world 4 as 2 nodes x 2
ranks, world 8 as 2 x 4 and 4 x 2 (one spawned job per world, every case inside it).

1. Same outputs, input and parameter gradients and drop counts as the flat path, with and without
   capacity, SMoE (h=1) and MH-MoE (h=4), one chunk and pipelined chunks (a2a_chunks 3).
   Exchanges per step: flat 5, two-level 1 + 8 per chunk (forward and backward).
2. Rails: every row that crosses nodes goes between ranks of one local index (rank (a, l) only ever
   sends rows to (b, l) of another node; only the small traffic vectors go to every rank), measured by wrapping dist.all_to_all_single (every exchange of both
   paths, forward and backward, asynchronous ones included). Each rank's inter-node bytes (its NIC's) equal
   the dispatcher's count and two_level.internode_formula on packet counts derived here from every rank's
   routing; at 2 nodes the total never exceeds the flat path's. Under uniform routing (debug_routing
   'balanced', 2 x 2) each rank's NIC carries 1/L of its node's packets within 10%.
3. The two-level experts phase is closed with the dispatcher's marks: device events where the device
   clock is on (faked here), like the flat path's.
4. model.moe.ep_dispatch: 'flat', 'two_level', and 'auto' by the cost model (moe/ep_cost.py) on a fast and
   a slow NIC, counted in exchanges.
5. The backward overlaps too: its 4 exchanges per chunk start asynchronously (comm.all_to_all_start's
   conjugate) and other exchanges start before some of them are waited on, as in the forward.
6. ep_recv_budget: a rank over it makes every rank raise the same error naming the setting (both paths);
   a budget that fits changes nothing.
Tolerance: fp32, atol 2e-5 / rtol 1e-4 (the paths add the same terms in another order).
"""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe import dispatcher as D
from megatron_mhmoe.moe import two_level
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.context import ParallelContext
from tests.distributed import run_workers
from tests.moe.path_step import step
from tests.moe.exchange_log import logged_exchanges

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from a2a_meter import A2AMeter  # noqa: E402

ATOL, RTOL = 2e-5, 1e-4
D_MODEL, E, TOKENS = 32, 8, 12
# (h, k, capacity factor, chunks)
CASES = [(4, 2, 0.0, 1), (4, 2, 1.0, 3), (1, 2, 1.0, 1), (1, 1, 0.0, 3)]
CASES_8 = [(4, 2, 0.0, 3), (1, 2, 1.0, 1)]  # world 8 on 2 shared cores: fewer, the same axes covered


def make_layer(ctx, per_node, h, k, cf, chunks, budget=0, debug="", mode="two_level", nic_gbps=400.0):
    cfg = ModelConfig(hidden_size=D_MODEL, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=k, num_heads=h, head_projection=h > 1, expert_hidden_size=16, capacity_factor=cf,
        gate="softmax", ep_ranks_per_node=per_node, a2a_chunks=chunks, ep_recv_budget=budget, debug_routing=debug,
        ep_dispatch=mode, ep_nic_gbps=nic_gbps))
    return MHMoELayer(cfg, ctx)


def packets(all_routes, layout: two_level.NodeLayout, me: int, E_node: int):
    """Packets rank `me` sends to / receives from other nodes, from every rank's routing: one per
    (sub-token, remote node) holding a kept choice, from (a, l) to (b, l)."""
    out = inn = 0
    for s, (experts, keep) in enumerate(all_routes):
        S, k = experts.shape
        kept = keep.view(k, S).t() if keep is not None else torch.ones(S, k, dtype=torch.bool)
        for i in range(S):
            for b in {int(e) // E_node for e, ok in zip(experts[i], kept[i]) if ok}:
                if b == layout.node(s):
                    continue
                out += s == me
                inn += layout.rail_peer(s, b) == me
    return out, inn


def worker(rank: int, world: int, layouts: list, cases: list) -> dict:
    ctx = ParallelContext.from_world(1, world)
    res = {}
    for per_node in layouts:
        for h, k, cf, chunks in cases:
            layer = make_layer(ctx, per_node, h, k, cf, chunks)
            layout = layer.dispatcher.layout
            torch.manual_seed(100 + rank)
            x = torch.randn(TOKENS, D_MODEL)
            flat, two = step(layer, x, True, per_node), step(layer, x, False, per_node)
            rec = {}  # the routing of this forward (same on both paths), from every rank, for the formula
            orig = layer.dispatcher.dispatch

            def spy(x_sub, record, run_experts):
                rec["r"] = (record.experts.clone(), None if record.keep is None else record.keep.clone())
                return orig(x_sub, record, run_experts)
            layer.dispatcher.dispatch = spy
            with torch.no_grad():
                layer(x)
            layer.dispatcher.dispatch = orig
            routes = comm.all_gather_object(rec["r"], ctx.ep_group)
            p_out, p_in = packets(routes, layout, ctx.ep_rank, E // world * per_node)
            formula = two_level.internode_formula(p_out, p_in, D_MODEL // h, k, 4, 1, world, per_node, chunks)
            res[(per_node, h, k, cf, chunks)] = dict(
                out_err=(two["y"] - flat["y"]).abs().max().item(),
                out_ok=torch.allclose(two["y"], flat["y"], atol=ATOL, rtol=RTOL),
                gx_ok=torch.allclose(two["gx"], flat["gx"], atol=ATOL, rtol=RTOL),
                grad_bad=[n for n, g in flat["grads"].items()
                          if not torch.allclose(two["grads"][n], g, atol=ATOL, rtol=RTOL)],
                same_grad_set=set(flat["grads"]) == set(two["grads"]),
                dropped=(two["dropped"], flat["dropped"]), sent=(two["sent"], flat["sent"]),
                two_meter=two["meter"].bytes_off_node, two_counted=two["counted"],
                flat_meter=flat["meter"].bytes_off_node, flat_counted=flat["counted"], formula=formula,
                calls=(two["calls"], flat["calls"]),
                rows_off_rail=sum(c["off_rail"] for c in two["meter"].per_call if c["floating"]),
                counts_off_rail=sum(c["off_rail"] for c in two["meter"].per_call if not c["floating"]))
    if world == 4:
        res.update(world4_extras(ctx, rank))
    return res


def tuned_auto(ctx, rank: int) -> dict:
    """7. 'auto' with ep_tune_forwards (moe/path_tuner.py)."""
    res = {}
    x = torch.randn(TOKENS, D_MODEL)
    # Fake clock: each path's forward costs what this rank says; alone, ranks 1-3 would pick two-level.
    now, cost = [0.0], {"flat": 1.0 if rank == 0 else 3.0, "two_level": 4.0 if rank == 0 else 1.0}
    layer = make_layer(ctx, 2, 4, 2, 0.0, 1, mode="auto")
    layer.dispatcher.tuner.clock = lambda: now[0]
    orig = (D.flat_dispatch_combine, two_level.dispatch_combine)

    def costed(name, fn):
        def run(*a):
            now[0] += cost[name]
            return fn(*a)
        return run
    D.flat_dispatch_combine, two_level.dispatch_combine = costed("flat", orig[0]), costed("two_level", orig[1])
    picks = []
    try:
        for _ in range(2 * (layer.moe.ep_tune_forwards + 1)):
            with A2AMeter(per_node=2) as meter:
                y, _ = layer(x.clone().requires_grad_(True))
                y.sum().backward()
            picks.append(meter.calls)
        with torch.no_grad(), A2AMeter(per_node=2) as meter:
            layer(x)  # evaluation: the prior, not counted
        res["tune_eval_calls"] = meter.calls
        with A2AMeter(per_node=2) as meter:
            layer(x.clone().requires_grad_(True))[0].sum().backward()
        picks.append(meter.calls)
    finally:
        D.flat_dispatch_combine, two_level.dispatch_combine = orig
    res["tune_picks"], res["tune_decided"] = picks, list(layer.dispatcher.tuner.decided.values())
    # The real clock: every forward of the trial and after it equals the flat path's.
    layer = make_layer(ctx, 2, 4, 2, 0.0, 3, mode="auto")
    ok = []
    for _ in range(2 * (layer.moe.ep_tune_forwards + 1) + 1):
        ref, got = step(layer, x, True, 2), step(layer, x, False, 2)
        ok.append(torch.allclose(got["y"], ref["y"], atol=ATOL, rtol=RTOL)
                  and torch.allclose(got["gx"], ref["gx"], atol=ATOL, rtol=RTOL))
    res["tune_equal"], res["tune_real"] = ok, list(layer.dispatcher.tuner.decided.values())
    return res


def world4_extras(ctx, rank: int) -> dict:
    res = {}
    # 2. Uniform routing: every rank's inter-node packets, 1/L of its node's.
    layer = make_layer(ctx, 2, 4, 2, 0.0, 1, debug="balanced")
    layer.train(False)
    torch.manual_seed(100 + rank)
    x = torch.randn(4 * TOKENS, D_MODEL)
    with torch.no_grad():
        layer(x)
    res["balanced_rows"] = layer.dispatcher.profile.internode_rows
    # 3. The experts phase on the device clock: spans of recorded (fake) events, not host seconds.
    events = []

    def record(device):
        ev = types.SimpleNamespace(query=lambda: False)
        events.append(ev)
        return ev
    orig = (D._device_clock, D._record_event)
    D._device_clock, D._record_event = (lambda device: True), record
    try:
        layer = make_layer(ctx, 2, 4, 2, 0.0, 1)
        with torch.no_grad():
            layer(x)
        prof = layer.dispatcher.profile
        res["event_phases"] = sorted({name for name, start, end in prof._pending})
        res["host_phases"] = sorted(prof._resolved)
    finally:
        D._device_clock, D._record_event = orig
    # 5. model.moe.ep_dispatch picks the path: exchanges per forward, flat 3, two-level 1 + 4.
    x = torch.randn(TOKENS, D_MODEL)
    for mode, gbps in (("flat", 400.0), ("two_level", 400.0), ("auto", 400.0), ("auto", 1e-4)):
        layer = make_layer(ctx, 2, 4, 2, 0.0, 1, mode=mode, nic_gbps=gbps)
        with A2AMeter(per_node=2) as meter, torch.no_grad():
            layer(x)
        res[("mode", mode, gbps)] = meter.calls
    res.update(tuned_auto(ctx, rank))
    # 6. The backward overlaps like the forward: its conjugate exchanges start asynchronously and another
    # chunk's work runs before they are waited on.
    layer = make_layer(ctx, 2, 4, 2, 0.0, 3)
    with logged_exchanges([]) as log:
        y, _ = layer(torch.randn(TOKENS, D_MODEL, requires_grad=True))
        fwd = len(log)
        y.sum().backward()
    res["log"] = (log[:fwd], log[fwd:])
    # 4. A budget below what the busiest rank receives: every rank raises, naming the setting.
    for flat in (True, False):
        layer = make_layer(ctx, 2, 4, 2, 0.0, 1, budget=TOKENS * 4 * 2 - 1)
        layer.dispatcher.force_flat = flat
        torch.manual_seed(100 + rank)
        try:
            layer(torch.randn(TOKENS, D_MODEL))
            res[("budget", flat)] = None
        except RuntimeError as err:
            res[("budget", flat)] = str(err)
        fits = make_layer(ctx, 2, 4, 2, 0.0, 1, budget=TOKENS * 4 * 2 * 4)
        fits.dispatcher.force_flat = flat
        y, _ = fits(torch.randn(TOKENS, D_MODEL))
        res[("budget_fits", flat)] = tuple(y.shape)
    return res


@pytest.fixture(scope="module")
def results():
    return {4: run_workers(worker, 4, [2], CASES, timeout_s=300),
            8: run_workers(worker, 8, [4, 2], CASES_8, timeout_s=400)}


def all_cases(results):
    for world, per_world in results.items():
        for rank, res in enumerate(per_world):
            for key, r in res.items():
                if isinstance(key, tuple) and len(key) == 5:
                    yield world, rank, key, r


def test_two_level_equals_flat(results):
    seen = set()
    for world, rank, case, r in all_cases(results):
        seen.add((world, case[0]))
        where = f"world {world} (per_node, h, k, cf, chunks)={case} rank {rank}"
        assert r["out_ok"], f"{where}: output differs by {r['out_err']:.3g}"
        assert r["gx_ok"], f"{where}: input gradient differs"
        assert r["same_grad_set"] and not r["grad_bad"], f"{where}: gradients differ for {r['grad_bad']}"
        assert r["dropped"][0] == r["dropped"][1] and r["sent"][0] == r["sent"][1], where
        # Exchanges per fwd+bwd step: flat 3 + 2 backward; two-level one traffic exchange, then per chunk
        # 4 (rail, fan-out and their returns) + 4 backward.
        assert r["calls"] == (1 + 8 * case[4], 5), f"{where}: all-to-all calls {r['calls']}"
    assert seen == {(4, 2), (8, 4), (8, 2)}, seen
    assert any(r["dropped"][1] > 0 for _, _, c, r in all_cases(results) if c[3] > 0), "capacity should drop"


def test_internode_bytes_equal_formula_and_not_above_flat(results):
    """Each rank's NIC carries its own rail's rows, as many bytes as the formula says."""
    for world, rank, case, r in all_cases(results):
        where = f"world {world} (per_node, h, k, cf, chunks)={case} rank {rank}"
        assert r["rows_off_rail"] == 0, f"{where}: {r['rows_off_rail']} row bytes to another node off this rank's rail"
        # Only the traffic vectors (N + EP int64 per chunk, one exchange) go to every rank.
        N = world // case[0]
        assert r["counts_off_rail"] == case[4] * (N + world) * 8 * (world - case[0] - (N - 1)), where
        assert r["two_meter"] == r["two_counted"], f"{where}: measured {r['two_meter']} != counted"
        assert r["flat_meter"] == r["flat_counted"], f"{where}: flat measured {r['flat_meter']} != counted"
        assert r["two_meter"] == r["formula"], f"{where}: measured {r['two_meter']} != {r['formula']}"
    # 2 nodes, k > 1: half of a sub-token's choice pairs share a node and cross once (with more nodes of
    # fewer experts the packet's gate and id columns can outweigh that: 4 x 2 at h=1 sends 3% more).
    for case in CASES:
        if case[3] == 1 and case[1] > 1:
            two = sum(res[(2,) + case]["two_meter"] for res in results[4])
            flat = sum(res[(2,) + case]["flat_meter"] for res in results[4])
            assert two <= flat, f"world 4 {case}: two-level {two} > flat {flat} inter-node bytes"


def test_uniform_routing_spreads_a_nodes_packets_over_its_rails(results):
    rows = [res["balanced_rows"] for res in results[4]]
    for node in (rows[:2], rows[2:]):
        assert min(node) > 0 and max(node) <= 1.1 * sum(node) / len(node), rows


def test_two_level_experts_phase_on_device_events(results):
    for res in results[4]:
        assert "experts" in res["event_phases"] and "all_to_all" in res["event_phases"], res["event_phases"]
        assert res["host_phases"] == [], res["host_phases"]


def test_ep_dispatch_setting_picks_the_path(results):
    for res in results[4]:
        # auto: 48 sub-tokens per rank on 400 Gbit/s NICs -> flat (latency); on a 100 kbit/s NIC -> two-level.
        assert [res[("mode", m, g)] for m, g in (("flat", 400.0), ("two_level", 400.0), ("auto", 400.0),
                                                  ("auto", 1e-4))] == [3, 5, 3, 5]


def test_auto_measures_both_paths_and_every_rank_keeps_the_slowest_ranks_pick(results):
    n = MoEConfig().ep_tune_forwards
    for res in results[4]:
        # Exchanges per fwd+bwd: flat 5, two-level 1 + 8. The prior (the cost model on a 400 Gbit/s NIC:
        # flat) first, then alternating; after the trial, the pick of the MAX over ranks: flat (3 < 4), though
        # ranks 1-3 alone measured two-level faster.
        assert res["tune_picks"] == [5, 9] * (n + 1) + [5], res["tune_picks"]
        assert res["tune_eval_calls"] == 3  # no_grad forward: the prior, flat
        assert res["tune_decided"] == [dict(picked="flat", flat_ms=3000.0, two_level_ms=4000.0, with_backward=True)]
        assert all(res["tune_equal"]), res["tune_equal"]
    real = [res["tune_real"][0]["picked"] for res in results[4]]
    assert len(set(real)) == 1, real


def overlapped(log: list) -> int:
    """Exchanges of the log (("start" | "wait", id) in order) during which another one started."""
    pos = {(kind, i): n for n, (kind, i) in enumerate(log)}
    return sum(any(kind == "start" and pos[("start", i)] < n < pos[("wait", i)] for n, (kind, _) in enumerate(log))
               for kind, i in log if kind == "start")


def test_backward_overlaps_like_the_forward(results):
    for res in results[4]:
        fwd, bwd = res["log"]
        # 3 chunks x 4 exchanges (rail, fan-out, their returns), each way; all asynchronous.
        assert sum(k == "start" for k, _ in fwd) == 12 and sum(k == "start" for k, _ in bwd) == 12, res["log"]
        assert overlapped(fwd) >= 2 and overlapped(bwd) >= 2, (overlapped(fwd), overlapped(bwd))


def test_receive_budget_error_on_every_rank(results):
    for flat in (True, False):
        msgs = [res[("budget", flat)] for res in results[4]]
        assert all(m is not None and "model.moe.ep_recv_budget" in m for m in msgs), msgs
        assert len({m.split("(this rank")[0] for m in msgs}) == 1, msgs  # the same verdict everywhere
        assert all(res[("budget_fits", flat)] == (TOKENS, D_MODEL) for res in results[4])
