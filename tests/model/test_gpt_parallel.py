"""The tensor/sequence/data-parallel GPT equals the single-process GPT with the same weights.

For TP in {1, 2, 4} with DP filling the world, sequence parallelism on and off, and a spread of
(norm, positions, activation, tied/untied): the logits (gathered over the vocabulary, unpadded), the
loss and every parameter's gradient (reduced with grads.reduce_gradients, gathered with
params.gather_full_grads) match a single-process model loaded from the same full state dict.
With DP > 1 each DP replica gets its own micro-batch; the reference loss is the mean of the
replicas' losses and the reference gradient is that mean's gradient.

The vocabulary (300) pads to 384 at TP=1 and 512 at TP=2/4, so a loss that depended on padding fails.
Weights are randomised away from their init (biases non-zero, norm weights != 1): a bias added before
a reduction, or a gradient reduced the wrong way, changes the numbers.

Tolerance (fp32): per tensor, ||parallel - reference|| <= RTOL * ||reference|| + ATOL.
All cases of one world size run in ONE spawn (a module-scoped fixture): spawning costs seconds.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_mhmoe.config import ModelConfig
from megatron_mhmoe.model import GPTModel
from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.grads import reduce_gradients
from megatron_mhmoe.parallel.params import gather_full_grads, gather_full_state_dict, shard_full_state_dict
from tests.distributed import run_workers

RTOL = 1e-5
ATOL = 1e-7
BATCH, SEQ = 2, 16
INIT_SEED = 7

BASE = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128,
                   max_seq_len=32, dropout=0.0)

# name -> (world, tp, sequence_parallel, config overrides)
CASES = {
    "w2_tp2": (2, 2, False, dict(norm="layernorm", position_embedding="learned", activation="gelu",
                                 tie_embeddings=True)),
    "w2_tp2_sp": (2, 2, True, dict(norm="rmsnorm", position_embedding="rope", activation="swiglu",
                                   tie_embeddings=False)),
    "w2_tp1_dp2": (2, 1, False, dict(norm="layernorm", position_embedding="rope", activation="gelu",
                                     tie_embeddings=False)),
    "w4_tp4_sp": (4, 4, True, dict(norm="layernorm", position_embedding="learned", activation="swiglu",
                                   tie_embeddings=True)),
    "w4_tp4": (4, 4, False, dict(norm="rmsnorm", position_embedding="rope", activation="gelu",
                                 tie_embeddings=False)),
    "w4_tp2_dp2_sp": (4, 2, True, dict(norm="rmsnorm", position_embedding="learned", activation="gelu",
                                       tie_embeddings=True)),
    "w4_tp2_dp2": (4, 2, False, dict(norm="layernorm", position_embedding="rope", activation="swiglu",
                                     tie_embeddings=False)),
    "w4_tp1_dp4": (4, 1, False, dict(norm="rmsnorm", position_embedding="learned", activation="swiglu",
                                     tie_embeddings=True)),
}


def case_config(name: str) -> ModelConfig:
    return dataclasses.replace(BASE, **CASES[name][3])


def full_state(cfg: ModelConfig, seed: int) -> dict:
    """A single-process state dict (true vocab), randomised away from the init."""
    model = GPTModel(cfg, ParallelContext.single_process(), seed=seed)
    state = gather_full_state_dict(model, ParallelContext.single_process(), true_vocab=cfg.vocab_size)
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def micro_batches(cfg: ModelConfig, dp: int, seed: int) -> list[tuple]:
    """(tokens, labels, loss_mask) per DP replica; the mask drops ~1/4 of the tokens."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(dp):
        tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
        labels = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
        mask = (torch.rand(BATCH, SEQ, generator=g) > 0.25).float()
        mask[0, 0] = 1.0
        out.append((tokens, labels, mask))
    return out


def _worker(rank: int, world: int, cases: dict) -> dict:
    results = {}
    for name, (tp, sp, cfg, state, batches) in cases.items():
        ctx = ParallelContext.from_world(tp_size=tp, sequence_parallel=sp)
        model = GPTModel(cfg, ctx)
        model.load_state_dict(shard_full_state_dict(model, state, ctx, cfg.padded_vocab_size(tp)))
        tokens, labels, mask = batches[ctx.dp_rank]
        out = model(tokens, labels=labels, loss_mask=mask, return_logits=True)
        out.loss.backward()
        # Padded vocab rows must get exactly zero gradient (the CE masks them to -inf).
        emb = model.embedding.word_embeddings
        pad_grad = max(float(p.grad[max(0, cfg.vocab_size - emb.vocab_start):].abs().sum())
                       for p in [emb.weight] + ([] if model.lm_head is None else [model.lm_head.weight]))
        reduce_gradients(model, ctx)
        grads = gather_full_grads(model, ctx, true_vocab=cfg.vocab_size)
        logits = comm.all_gather(out.logits.detach(), -1, ctx.tp_group)[..., :cfg.vocab_size]  # (b, s, V)
        # Init invariance: the same seed gives the same full model at this TP as at TP=1.
        fresh = GPTModel(cfg, ctx, seed=INIT_SEED)
        init_full = gather_full_state_dict(fresh, ctx, true_vocab=cfg.vocab_size)
        results[name] = dict(dp_rank=ctx.dp_rank, tp_rank=ctx.tp_rank, loss=out.loss.detach(),
                             logits=logits, pad_grad=pad_grad, num_params=fresh.num_params(),
                             grads=grads if rank == 0 else None, init=init_full if rank == 0 else None)
    return results


def _reference(name: str) -> dict:
    cfg = case_config(name)
    world, tp = CASES[name][0], CASES[name][1]
    state, batches = full_state(cfg, seed=len(name)), micro_batches(cfg, world // tp, seed=len(name))
    single = ParallelContext.single_process()
    model = GPTModel(cfg, single)
    model.load_state_dict(shard_full_state_dict(model, state, single, cfg.padded_vocab_size(1)))
    outs = [model(t, labels=l, loss_mask=m, return_logits=True) for t, l, m in batches]
    torch.stack([o.loss for o in outs]).mean().backward()
    fresh = GPTModel(cfg, single, seed=INIT_SEED)
    return dict(cfg=cfg, state=state, batches=batches, losses=[o.loss.detach() for o in outs],
                logits=[o.logits.detach()[..., :cfg.vocab_size] for o in outs],
                grads=gather_full_grads(model, single, true_vocab=cfg.vocab_size),
                init=gather_full_state_dict(fresh, single, true_vocab=cfg.vocab_size),
                num_params=fresh.num_params())


def _run_world(world: int) -> dict:
    names = [n for n, c in CASES.items() if c[0] == world]
    refs = {n: _reference(n) for n in names}
    cases = {n: (CASES[n][1], CASES[n][2], refs[n]["cfg"], refs[n]["state"], refs[n]["batches"]) for n in names}
    per_rank = run_workers(_worker, world, cases)
    return {n: (refs[n], [r[n] for r in per_rank]) for n in names}


@pytest.fixture(scope="module")
def world2():
    return _run_world(2)


@pytest.fixture(scope="module")
def world4():
    return _run_world(4)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = float((actual - expected).norm())
    bound = RTOL * float(expected.norm()) + ATOL
    assert err <= bound, f"{what}: |diff| = {err:.3e} > {bound:.3e} (|ref| = {float(expected.norm()):.3e})"


def _check(results: dict, name: str) -> None:
    ref, ranks = results[name]
    for r in ranks:
        d = r["dp_rank"]
        assert_close_rel(r["loss"], ref["losses"][d], f"{name} rank loss (dp {d})")
        assert_close_rel(r["logits"], ref["logits"][d], f"{name} logits (dp {d})")
        assert r["pad_grad"] == 0.0, f"{name}: padded vocab rows got gradient {r['pad_grad']}"
        assert r["num_params"] == ref["num_params"]
    grads = ranks[0]["grads"]
    assert set(grads) == set(ref["grads"])
    for k, g in ref["grads"].items():
        assert grads[k].shape == g.shape, k
        assert g.norm() > 0, f"reference gradient of {k} is zero: the test would not see a bug there"
        assert_close_rel(grads[k], g, f"{name} grad {k}")
    for k, v in ref["init"].items():
        assert torch.equal(ranks[0]["init"][k], v), f"{name}: init of {k} differs from TP=1"


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][0] == 2])
def test_matches_single_process_world2(world2, name):
    _check(world2, name)


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][0] == 4])
def test_matches_single_process_world4(world4, name):
    _check(world4, name)


def test_cases_cover_the_variants():
    """The case table spans every option the brief asks for."""
    seen = {(k, v) for c in CASES.values() for k, v in c[3].items()}
    for key, values in [("norm", ("layernorm", "rmsnorm")), ("position_embedding", ("learned", "rope")),
                        ("activation", ("gelu", "swiglu")), ("tie_embeddings", (True, False))]:
        for v in values:
            assert (key, v) in seen, (key, v)
    assert {c[1] for c in CASES.values()} == {1, 2, 4}
    assert {c[2] for c in CASES.values() if c[1] > 1} == {True, False}
