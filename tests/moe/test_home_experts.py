"""The flat EP path runs a rank's own ("home") rows through its experts while the exchange of the other rows
is in flight, in the forward and in the backward (moe/dispatcher.py, _exchange_around_home_experts).

Checked by the order of events on each rank: the starts and waits of the asynchronous all-to-alls and the
expert calls (forward) and expert-input gradients (backward). Outputs and gradients of this path against
the single-process layer are tests/moe/test_layer_parallel.py's (EP=2: one peer, no regrouping; EP=4:
three peers, regrouped).
"""
from __future__ import annotations

import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.parallel.context import ParallelContext
from tests.distributed import run_workers
from tests.moe.exchange_log import logged_exchanges


class _LogGrad(torch.autograd.Function):
    """Identity; its backward appends ("experts_bwd", call) once the experts' backward has produced dL/drows."""

    @staticmethod
    def forward(ctx, rows, log, call):
        ctx.log, ctx.call = log, call
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, g):
        ctx.log.append(("experts_bwd", ctx.call))
        return g, None, None


def _worker(rank: int, world: int) -> dict:
    ctx = ParallelContext.from_world(1, world)
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, num_layers=2, moe=MoEConfig(
        num_experts=4, top_k=2, num_heads=2, expert_hidden_size=16, capacity_factor=0.0))
    layer = MHMoELayer(cfg, ctx)
    log, calls = [], []
    orig_experts = layer.experts.forward

    def experts(rows, counts):
        call = len(calls)
        calls.append(rows.shape[0])
        out = orig_experts(_LogGrad.apply(rows, log, call), counts)
        log.append(("experts", call))
        return out

    layer.experts.forward = experts
    with logged_exchanges(log):
        torch.manual_seed(rank)
        y, _ = layer(torch.randn(8, 4, 32, requires_grad=True))
        fwd = len(log)
        y.square().sum().backward()
    prof = layer.dispatcher.profile
    return dict(fwd=log[:fwd], bwd=log[fwd:], rows=calls, home=prof.rows_home, received=prof.rows_received)


def _in_flight(log: list, event: tuple) -> bool:
    """Some exchange started before `event` and was waited on after it."""
    at = log.index(event)
    return any(k == "start" and n < at < log.index(("wait", i)) for n, (k, i) in enumerate(log))


def test_home_rows_run_while_the_exchange_is_in_flight_both_ways():
    for rank, res in enumerate(run_workers(_worker, 2, timeout_s=120)):
        fwd, bwd = res["fwd"], res["bwd"]
        # Two asynchronous exchanges each way (dispatch, combine), two expert calls: home rows first.
        assert [k for k, _ in fwd].count("start") == 2 and [k for k, _ in bwd].count("start") == 2, res
        assert len(res["rows"]) == 2 and res["rows"][0] > 0 and res["rows"][1] > 0, res
        assert _in_flight(fwd, ("experts", 0)), f"rank {rank}: home experts ran outside the exchange: {fwd}"
        assert _in_flight(bwd, ("experts_bwd", 0)), f"rank {rank}: home backward ran outside the exchange: {bwd}"
        # The received rows wait for the exchange: they run after it, not inside it.
        assert not _in_flight(fwd, ("experts", 1)), fwd
        # Home rows never travel: the experts ran this rank's own rows, then those received.
        assert res["rows"] == [res["home"], res["received"]], res
