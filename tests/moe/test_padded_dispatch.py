"""Capacity-slot dispatch without host synchronisation (MoEConfig.a2a_device_counts, moe/padded_dispatch.py).

- At world 4 (EP=4; TP=2 x EP=2 with sequence parallelism; TP=2 x EP=4), capacity factors 0.5, 1 and 2, h=1
  and h=4: the same outputs, gradients, kept counts and drops as the count-sized flat path with the same
  weights (fp32, atol 1e-6 / rtol 1e-5: only the summation order of the expert GEMMs' padding differs).
- The dispatch reads nothing back to the host: with Tensor.tolist / item / nonzero / bool / int / float made
  to raise, the slot path runs and the count-sized path fails (so the trap is real). This sees Python-level
  reads only; the C++ ones (boolean masks, bincount) are avoided by construction (moe/padded_dispatch.py).
- The receive buffer is EP x E_local x capacity rows whatever the routing; ep_recv_budget below that, and
  dropless routing, are refused with errors naming the settings.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.grads import reduce_gradients
from tests.distributed import run_workers

ATOL, RTOL = 1e-6, 1e-5
SEQ, BATCH, D = 8, 2, 32


def configs(h: int, cf: float, E: int = 8) -> tuple[ModelConfig, ModelConfig]:
    cfg = ModelConfig(hidden_size=D, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=2, num_heads=h, head_projection=h > 1, expert_hidden_size=16, capacity_factor=cf))
    return cfg, dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, a2a_device_counts=True))


def run_pair(ctx: ParallelContext, h: int, cf: float, seed: int) -> dict:
    flat_cfg, slot_cfg = configs(h, cf)
    flat, slot = MHMoELayer(flat_cfg, ctx), MHMoELayer(slot_cfg, ctx)  # the same seeded init
    slot.load_state_dict(flat.state_dict())
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(ctx.dp_size, SEQ, BATCH, D, generator=g)
    G = torch.randn(ctx.dp_size, SEQ, BATCH, D, generator=g)
    x, gy = X[ctx.dp_rank], G[ctx.dp_rank]
    if ctx.sequence_parallel:
        x, gy = x.chunk(ctx.tp_size, 0)[ctx.tp_rank], gy.chunk(ctx.tp_size, 0)[ctx.tp_rank]
    out = {}
    for name, layer in (("flat", flat), ("slot", slot)):
        y, st = layer(x)
        ((y * gy).sum() + 0.01 * st.aux_loss).backward()
        reduce_gradients(layer, ctx)
        out[name] = dict(y=y.detach(), kept=st.kept.clone(), dropped=st.dropped,
                         grads={n: p.grad.clone() for n, p in layer.named_parameters()})
    a, b = out["flat"], out["slot"]
    return dict(out_ok=torch.allclose(a["y"], b["y"], atol=ATOL, rtol=RTOL), out_err=(a["y"] - b["y"]).abs().max().item(),
                kept_equal=torch.equal(a["kept"], b["kept"]), dropped=(a["dropped"], b["dropped"]),
                grad_bad=[n for n in a["grads"] if not torch.allclose(a["grads"][n], b["grads"][n], atol=ATOL, rtol=RTOL)])


def worker(rank: int, world: int) -> dict:
    results = {}
    for (tp, ep, sp), h, cf in itertools.product([(1, 4, False), (2, 2, True), (2, 4, False)], [1, 4], [0.5, 1.0, 2.0]):
        ctx = ParallelContext.from_world(tp, ep, sequence_parallel=sp)
        results[(tp, ep, sp, h, cf)] = run_pair(ctx, h, cf, seed=hash((tp, ep, h)) % 1000)
    return results


@pytest.fixture(scope="module")
def world4():
    return run_workers(worker, 4, timeout_s=300)


def test_slot_dispatch_equals_count_sized_dispatch_at_world4(world4):
    drops = []
    for rank, results in enumerate(world4):
        for case, r in results.items():
            where = f"(tp, ep, sp, h, cf)={case} rank {rank}"
            assert r["out_ok"], f"{where}: outputs differ by {r['out_err']:.3g}"
            assert r["kept_equal"] and r["dropped"][0] == r["dropped"][1], f"{where}: {r['dropped']}"
            assert not r["grad_bad"], f"{where}: gradients differ for {r['grad_bad']}"
            drops.append(r["dropped"][0])
    assert max(drops) > 0 and min(drops) == 0  # cf 0.5 drops, cf 2 (here) does not: both regimes ran


@contextlib.contextmanager
def no_host_reads():
    """Every way a tensor's values reach Python raises (what would stall a GPU stream)."""
    def refuse(*a, **k):
        raise AssertionError("host read of a tensor value during dispatch")
    names = ("tolist", "item", "nonzero", "__bool__", "__int__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def _routed(layer: MHMoELayer, x: torch.Tensor):
    """What the layer hands the dispatcher: sub-tokens and the routing record."""
    from megatron_mhmoe.moe import capacity as cap
    from megatron_mhmoe.moe.router import choose
    from megatron_mhmoe.moe.routing import build_record
    moe = layer.moe
    x_sub = layer.head(x.reshape(-1, D)).reshape(-1, layer.d_sub)
    choice = choose(layer.router(x_sub), moe)
    c = cap.expert_capacity(moe.capacity_factor, moe.top_k, x_sub.shape[0], moe.num_experts)
    return x_sub, build_record(choice, moe.num_experts, c, layer.dispatcher, 0)


def test_slot_dispatch_reads_nothing_back_to_the_host():
    flat_cfg, slot_cfg = configs(4, 1.0)
    torch.manual_seed(0)
    for cfg, must_read in ((slot_cfg, False), (flat_cfg, True)):
        layer = MHMoELayer(cfg, ParallelContext.single_process())
        x_sub, rec = _routed(layer, torch.randn(SEQ, BATCH, D))
        layer.dispatcher.profile_enabled = False
        raised = False
        try:
            with no_host_reads():
                layer.dispatcher.dispatch(x_sub, rec, layer.experts)
        except AssertionError:
            raised = True
        assert raised == must_read, cfg.moe.a2a_device_counts


def test_receive_buffer_is_static_and_bounded_by_the_budget():
    _, slot_cfg = configs(4, 1.0)
    layer = MHMoELayer(slot_cfg, ParallelContext.single_process())
    x_sub, rec = _routed(layer, torch.randn(SEQ, BATCH, D))
    layer.dispatcher.dispatch(x_sub, rec, layer.experts)
    assert layer.dispatcher.profile.rows_received == 8 * rec.capacity  # EP 1 x E_local 8 x capacity
    layer.dispatcher.recv_budget = 8 * rec.capacity - 1
    with pytest.raises(RuntimeError, match=r"receive buffer of EP x E_local x capacity = 1 x 8 x \d+ = \d+ rows, "
                                           r"over model.moe.ep_recv_budget"):
        layer.dispatcher.dispatch(x_sub, rec, layer.experts)


def test_dropless_routing_is_refused():
    cfg = configs(4, 0.0)[1]
    with pytest.raises(ValueError, match="a2a_device_counts=true sizes the receive buffer from the capacity"):
        cfg.validate()
