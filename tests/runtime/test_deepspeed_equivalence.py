"""DeepSpeed engine with an MH-MoE GPT: ZeRO 0/1/2 at (TP, EP) layouts on 2 and 4 processes train with the
same losses and gradient norms as the single-process ZeRO-0 run on the same global batch.

The single-process reference uses micro-batch 2 with 2 accumulation steps, so its routing groups (one per
micro-batch) are the same as those of DP=2 with micro-batch 2: then even the balance loss matches.
Global batch 4 sequences, gradient clipping at 0.5 (active: the norms are ~1.3-1.5), 3 optimizer steps.
Tolerance: losses rel 2e-5, grad norms rel 1e-4 (fp32; reduction order differs between layouts).
This also checks that ZeRO's grad norm counts every expert once (DeepSpeed's MoE norm is a known bug class)
and that the stage-0 path clips with the exact norm (parallel.grads.global_grad_norm).
"""
from __future__ import annotations

import os

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from tests.distributed import run_workers

STEPS, GLOBAL_BATCH, SEQ = 3, 4, 16

CASES = {  # world: [(tp, ep, zero_stage)]
    1: [(1, 1, 0), (1, 1, 1)],
    2: [(1, 2, 0), (1, 2, 1), (1, 2, 2), (2, 2, 2), (2, 1, 1)],
    4: [(2, 4, 1), (2, 2, 2), (2, 4, 0)],
}


def model_config() -> ModelConfig:
    return ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                       max_seq_len=SEQ, moe=MoEConfig(num_experts=4, top_k=2, num_heads=2, expert_hidden_size=16,
                                                      moe_every=2, capacity_factor=1.0))


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 300, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))


def train_case(ctx_args, world: int) -> tuple[list, list]:
    from megatron_mhmoe.model.gpt import GPTModel
    from megatron_mhmoe.parallel.context import ParallelContext
    from megatron_mhmoe.parallel.grads import clip_gradients_
    from megatron_mhmoe.runtime import engine as ds
    from megatron_mhmoe.runtime.run_config import RunConfig

    tp, ep, zero = ctx_args
    ctx = ParallelContext.from_world(tp, ep)
    rc = RunConfig(model=model_config())
    rc.parallel.tp, rc.parallel.ep = tp, ep
    rc.train.micro_batch_size, rc.train.global_batch_size = 2, GLOBAL_BATCH
    rc.train.zero_stage, rc.train.seq_len, rc.train.clip_grad = zero, SEQ, 0.5
    rc.validate(world)
    engine = ds.initialize(GPTModel(rc.model, ctx), rc, ctx, ds.build_ds_config(rc, world), lambda s: 1.0)
    G, mb = rc.train.grad_accum_steps, rc.train.micro_batch_size
    losses, norms = [], []
    for step in range(STEPS):
        b = batch(step)
        total = torch.zeros(1, dtype=torch.float64)
        for m in range(G):
            i0 = (ctx.dp_rank * G + m) * mb  # this DP rank's consecutive share, as the data sampler does
            x = b[i0:i0 + mb]
            out = engine(x[:, :-1], labels=x[:, 1:])
            engine.backward(out.loss)
            total += float(out.loss.detach()) / G
            if m == G - 1 and zero == 0:
                norms.append(clip_gradients_(engine.module, ctx, rc.train.clip_grad))
            engine.step()
        if ctx.dp_group is not None:
            torch.distributed.all_reduce(total, group=ctx.dp_group)
        losses.append(float(total) / ctx.dp_size)
        if zero > 0:
            norms.append(float(engine.get_global_grad_norm()))
    return losses, norms


def worker(rank: int, world: int) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from megatron_mhmoe.runtime import engine as ds
    ds.init_distributed(120)
    return {case: train_case(case, world) for case in CASES[world]}


@pytest.fixture(scope="module")
def reference():
    return run_workers(worker, 1, timeout_s=300)[0]


@pytest.mark.parametrize("world", [2, 4])
def test_zero_stages_match_single_process(world, reference):
    ref_losses, ref_norms = reference[(1, 1, 0)]
    assert ref_norms[0] > 0.5, "clipping must be active for the norm check to mean anything"
    # ZeRO-1 on one process agrees with ZeRO-0 on one process.
    assert reference[(1, 1, 1)][0] == pytest.approx(ref_losses, rel=2e-5)
    results = run_workers(worker, world, timeout_s=400)
    for rank, per_case in enumerate(results):
        for case, (losses, norms) in per_case.items():
            where = f"world {world} (tp, ep, zero)={case} rank {rank}"
            assert losses == pytest.approx(ref_losses, rel=2e-5), where
            assert norms == pytest.approx(ref_norms, rel=1e-4), where
    assert ref_losses[-1] < ref_losses[0]
