"""Sequence parallelism through the real DeepSpeed path: Trainer.train_step at TP=2 with
parallel.sequence_parallel on (norm and router parameters see only their s/TP tokens, so their gradients
must be summed over TP before DeepSpeed reduces them), fp32, against the one-process ZeRO-0 reference of
test_deepspeed_equivalence.py with its tolerances (losses rel 2e-5, gradient norms rel 1e-4)."""
from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import run_workers
from tests.runtime.test_deepspeed_equivalence import GLOBAL_BATCH, SEQ, STEPS, micro_batches, model_config

# world 2: (tp, ep, zero_stage, sequence_parallel)
CASES = [(2, 2, 1, True), (2, 1, 0, True), (2, 2, 2, True)]
REFERENCE = (1, 1, 0, False)


def train(case) -> tuple[list, list]:
    from megatron_mhmoe.model.gpt import GPTModel
    from megatron_mhmoe.parallel.context import ParallelContext
    from megatron_mhmoe.runtime.engine import Engine
    from megatron_mhmoe.runtime.run_config import RunConfig
    from megatron_mhmoe.runtime.trainer import Trainer

    tp, ep, zero, sp = case
    ctx = ParallelContext.from_world(tp, ep, sp)
    assert ctx.sequence_parallel == sp
    rc = RunConfig(model=model_config("fp32"))
    rc.parallel.tp, rc.parallel.ep, rc.parallel.sequence_parallel = tp, ep, sp
    rc.train.micro_batch_size, rc.train.global_batch_size = 2, GLOBAL_BATCH
    rc.train.zero_stage, rc.train.seq_len, rc.train.clip_grad, rc.train.precision = zero, SEQ, 0.5, "fp32"
    rc.validate(ctx.world_size)
    torch.manual_seed(0)
    trainer = Trainer(rc, device_guard=True)
    trainer.attach(ctx, Engine(GPTModel(rc.model, ctx), rc, ctx, lambda s: 1.0))
    batches = micro_batches(ctx, rc.train.grad_accum_steps, rc.train.micro_batch_size)
    losses, norms = [], []
    for _ in range(STEPS):
        r = trainer.train_step(batches)
        losses.append(r["loss"])
        norms.append(r["grad_norm"])
    return losses, norms


def worker(rank: int, world: int) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from megatron_mhmoe.runtime import engine
    engine.init_distributed(120)
    return {case: train(case) for case in ([REFERENCE] if world == 1 else CASES)}


def test_sequence_parallel_matches_single_process():
    ref_losses, ref_norms = run_workers(worker, 1, timeout_s=300)[0][REFERENCE]
    assert ref_norms[0] > 0.5, "clipping must be active for the norm check to mean anything"
    for rank, per_case in enumerate(run_workers(worker, 2, timeout_s=300)):
        for case, (losses, norms) in per_case.items():
            where = f"(tp, ep, zero, sp)={case} rank {rank}"
            assert losses == pytest.approx(ref_losses, rel=2e-5), where
            assert norms == pytest.approx(ref_norms, rel=1e-4), where
    assert ref_losses[-1] < ref_losses[0]
