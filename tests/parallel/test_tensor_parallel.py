"""Tensor-parallel layers, vocab-parallel cross-entropy and TP/EP-invariant init, layer by layer.

One spawn of 2 gloo processes runs every case (TP=2 with and without sequence parallelism, EP=2 for
the init); the parent compares against plain torch on the full tensors (float64, so the tolerance is
tight: rtol 1e-10). The whole GPT is compared in tests/model/test_gpt_parallel.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_mhmoe.config import ModelConfig
from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel import init as pinit
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.cross_entropy import masked_mean, vocab_parallel_cross_entropy
from megatron_mhmoe.parallel.grads import reduce_tp_partial_grads
from megatron_mhmoe.parallel.params import gather_full_grads, gather_full_state_dict, mark_expert, \
    shard_full_state_dict
from megatron_mhmoe.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from tests.distributed import run_workers

S, B, D, FF, V = 4, 2, 8, 16, 300
TOL = dict(rtol=1e-10, atol=1e-12)
CFG = ModelConfig(vocab_size=V, hidden_size=D, num_layers=2, num_attention_heads=2, ffn_hidden_size=FF)


def _t(salt: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(salt), dtype=torch.float64)


class Pair(nn.Module):
    """column(d -> ff) -> gelu -> row(ff -> d), both with bias."""

    def __init__(self, ctx):
        super().__init__()
        self.col = ColumnParallelLinear(D, FF, ctx)
        self.row = RowParallelLinear(FF, D, ctx)

    def forward(self, x):
        return self.row(F.gelu(self.col(x)))


class Toy(nn.Module):
    """One parameter of each layout kind, for init invariance."""

    def __init__(self, ctx):
        super().__init__()
        self.config = CFG
        self.col = ColumnParallelLinear(D, FF, ctx, init_method=pinit.normal(0.5))
        self.row = RowParallelLinear(FF, D, ctx)
        self.emb = VocabParallelEmbedding(V, CFG.padded_vocab_size(ctx.tp_size), D, ctx)
        self.experts = nn.Parameter(torch.empty(4 // ctx.ep_size, D, FF))  # 4 experts in all
        mark_expert(self.experts, ctx)
        pinit.set_init(self.experts, pinit.xavier_uniform(gain=2.0))
        self.scale = nn.Parameter(torch.full((D,), 0.3))  # 1-D, no init method: kept


def full_pair_state() -> dict:
    return {"col.weight": _t(1, FF, D), "col.bias": _t(2, FF), "row.weight": _t(3, D, FF), "row.bias": _t(4, D)}


def _worker(rank: int, world: int) -> dict:
    torch.set_default_dtype(torch.float64)
    out = {}
    for sp in (False, True):
        ctx = ParallelContext.from_world(tp_size=2, sequence_parallel=sp)
        seq = slice(ctx.tp_rank * S // 2, (ctx.tp_rank + 1) * S // 2) if sp else slice(None)

        # column -> row pair; upstream grad w is the full one restricted to this rank's tokens
        pair = Pair(ctx)
        pair.load_state_dict(shard_full_state_dict(pair, full_pair_state(), ctx))
        x = _t(5, S, B, D)[seq].clone().requires_grad_()
        y = pair(x)
        (y * _t(6, S, B, D)[seq]).sum().backward()
        reduce_tp_partial_grads(pair, ctx)  # row bias under SP
        out[("pair", sp)] = dict(y=comm.all_gather(y.detach(), 0, ctx.tp_group) if sp else y.detach(),
                                 dx=comm.all_gather(x.grad, 0, ctx.tp_group) if sp else x.grad,
                                 grads=gather_full_grads(pair, ctx),
                                 bias_partial=getattr(pair.row.bias, "tp_partial_grad", False))

        # vocab-parallel embedding
        emb = VocabParallelEmbedding(V, CFG.padded_vocab_size(2), D, ctx)
        emb.load_state_dict(shard_full_state_dict(emb, {"weight": _t(7, V, D)}, ctx, CFG.padded_vocab_size(2)))
        ids = torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(8))
        e = emb(ids)
        (e * _t(9, S, B, D)[seq]).sum().backward()
        out[("emb", sp)] = dict(e=comm.all_gather(e.detach(), 0, ctx.tp_group) if sp else e.detach(),
                                grad=gather_full_grads(emb, ctx, true_vocab=V)["weight"],
                                pad_grad=emb.weight.grad[max(0, V - emb.vocab_start):].abs().sum())

    # cross-entropy; padded size 640 so rank 1's shard [320, 640) is all padding, filled with garbage
    ctx = ParallelContext.from_world(tp_size=2)
    full = _t(10, S, B, 640)
    full[..., V:] = 50.0 + _t(11, S, B, 640 - V)  # would dominate the softmax if not masked
    local = full.chunk(2, -1)[ctx.tp_rank].clone().requires_grad_()
    target = torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(12))
    target[0, 0], target[0, 1] = 0, V - 1  # first and last real ids (different ranks)
    mask = (_t(13, S, B) > 0).double()
    loss_tok = vocab_parallel_cross_entropy(local, target, ctx, V)
    loss = masked_mean(loss_tok, mask)
    loss.backward()
    out["ce"] = dict(loss_tok=loss_tok.detach(), loss=loss.detach(),
                     grad=comm.all_gather(local.grad, -1, ctx.tp_group))

    # TP/EP-invariant init
    torch.set_default_dtype(torch.float32)
    for tp, ep in ((2, 1), (1, 2), (2, 2)):
        ctx = ParallelContext.from_world(tp_size=tp, ep_size=ep)
        toy = Toy(ctx)
        pinit.init_parameters(toy, ctx, seed=11)
        out[("init", tp, ep)] = gather_full_state_dict(toy, ctx, true_vocab=V)
        out[("init_pad", tp, ep)] = toy.emb.weight.detach()[max(0, V - toy.emb.vocab_start):].abs().sum()
    return out


@pytest.fixture(scope="module")
def results():
    return run_workers(_worker, 2)


@pytest.mark.parametrize("sp", [False, True], ids=["no_sp", "sp"])
def test_column_row_pair(results, sp):
    torch.set_default_dtype(torch.float64)
    try:
        ref = Pair(ParallelContext.single_process())
        ref.load_state_dict(full_pair_state())
        x = _t(5, S, B, D).requires_grad_()
        y = ref(x)
        (y * _t(6, S, B, D)).sum().backward()
    finally:
        torch.set_default_dtype(torch.float32)
    for res in results:
        r = res[("pair", sp)]
        torch.testing.assert_close(r["y"], y.detach(), **TOL)
        torch.testing.assert_close(r["dx"], x.grad, **TOL)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(r["grads"][name], p.grad, **TOL, msg=name)
        assert r["bias_partial"] == sp  # the row bias sees only this rank's tokens under SP


@pytest.mark.parametrize("sp", [False, True], ids=["no_sp", "sp"])
def test_vocab_parallel_embedding(results, sp):
    weight = _t(7, V, D).requires_grad_()
    ids = torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(8))
    e = F.embedding(ids, weight)
    (e * _t(9, S, B, D)).sum().backward()
    for res in results:
        r = res[("emb", sp)]
        torch.testing.assert_close(r["e"], e.detach(), **TOL)
        torch.testing.assert_close(r["grad"], weight.grad, **TOL)
        assert float(r["pad_grad"]) == 0.0


def test_vocab_parallel_cross_entropy(results):
    logits = _t(10, S, B, 640)[..., :V].clone().requires_grad_()
    target = torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(12))
    target[0, 0], target[0, 1] = 0, V - 1
    mask = (_t(13, S, B) > 0).double()
    loss_tok = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), reduction="none").view(S, B)
    loss = (loss_tok * mask).sum() / mask.sum()
    loss.backward()
    for res in results:
        r = res["ce"]
        torch.testing.assert_close(r["loss_tok"], loss_tok.detach(), **TOL)
        torch.testing.assert_close(r["loss"], loss.detach(), **TOL)
        torch.testing.assert_close(r["grad"][..., :V], logits.grad, **TOL)
        assert torch.equal(r["grad"][..., V:], torch.zeros(S, B, 640 - V, dtype=torch.float64))


def test_cross_entropy_single_process_fp32_and_bf16():
    """Group None path, and low-precision logits: loss in fp32, grad in the logits' dtype."""
    ctx = ParallelContext.single_process()
    logits = torch.randn(5, 3, 384)
    target = torch.randint(0, V, (5, 3))
    before = logits.clone()
    ref = F.cross_entropy(logits[..., :V].reshape(-1, V), target.reshape(-1), reduction="none").view(5, 3)
    torch.testing.assert_close(vocab_parallel_cross_entropy(logits, target, ctx, V), ref)
    assert torch.equal(logits, before)  # the padded columns were masked in a copy, not in the caller's tensor
    lb = logits.bfloat16().requires_grad_()
    loss = vocab_parallel_cross_entropy(lb, target, ctx, V)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert lb.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2), (2, 2)])
def test_init_is_layout_invariant(results, tp, ep):
    single = ParallelContext.single_process()
    toy = Toy(single)
    pinit.init_parameters(toy, single, seed=11)
    ref = gather_full_state_dict(toy, single, true_vocab=V)
    assert float(ref["experts"].abs().max()) <= 2.0 * (6.0 / (D + FF)) ** 0.5  # xavier on (out, in) dims
    assert torch.equal(ref["scale"], torch.full((D,), 0.3))
    assert abs(float(ref["col.weight"].std()) - 0.5) < 0.15 and torch.equal(ref["col.bias"], torch.zeros(FF))
    for res in results:
        got = res[("init", tp, ep)]
        assert set(got) == set(ref)
        for k in ref:
            assert torch.equal(got[k], ref[k]), k
        assert float(res[("init_pad", tp, ep)]) == 0.0  # padded vocab rows start at zero


def test_param_seed_stable_and_distinct():
    assert pinit.param_seed(1234, "a.weight") == pinit.param_seed(1234, "a.weight")
    seeds = {pinit.param_seed(s, n) for s in range(50) for n in ("a.weight", "b.weight", "layers.0.x")}
    assert len(seeds) == 150 and all(0 <= s < 2 ** 32 for s in seeds)
