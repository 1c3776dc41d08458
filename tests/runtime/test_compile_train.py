"""train.compile=true (model/compile.py) in the real training step, at world 2 (EP=2, gloo), one spawned job:

- Engine compiles every transformer block in place (parameter names unchanged), and 5 training steps give
  the same losses as eager with the same weights and batches: |loss_compiled - loss_eager| <= 1e-5 x loss
  per step (fp32; the traced MoE experts run batched GEMMs over the capacity slots, eager the grouped
  per-expert node: only the summation order differs, which compounds a little over optimizer steps).
- Each block (block 0 dense, block 1 MoE with a2a_device_counts at EP=2, all-to-alls inside) compiles
  without a graph break (Dynamo's graph_break counter stays empty) into exactly one graph per block, used
  by all 5 steps, with static shapes (no tensor whose size depends on values).
Backend aot_eager (tests/moe/test_compile.py says why); activation checkpointing on, so a compiled block
is also recomputed in backward.
"""
from __future__ import annotations

import os

import torch

from tests.distributed import run_workers

STEPS, SEQ, MB, LOSS_RTOL = 5, 16, 2, 1e-5
BACKEND = "test_static_aot_eager"  # tests.moe.test_compile.StaticShapeBackend, registered in the worker


def _model_config():
    from megatron_mhmoe.config import ModelConfig, MoEConfig
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                       max_seq_len=SEQ, moe=MoEConfig(num_experts=4, top_k=2, num_heads=2, head_projection=True,
                                                      expert_hidden_size=16, capacity_factor=1.0,
                                                      a2a_device_counts=True))


def _losses(rank: int, world: int, compile_: bool) -> tuple[list[float], list[bool]]:
    from megatron_mhmoe.model.compile import compiled_blocks
    from megatron_mhmoe.model.gpt import GPTModel
    from megatron_mhmoe.parallel.context import ParallelContext
    from megatron_mhmoe.runtime.engine import Engine
    from megatron_mhmoe.runtime.run_config import RunConfig
    from megatron_mhmoe.runtime.trainer import Trainer

    rc = RunConfig(model=_model_config())
    rc.parallel.ep = world
    rc.train.micro_batch_size, rc.train.global_batch_size, rc.train.seq_len = MB, MB * world, SEQ
    rc.train.compile, rc.train.compile_backend, rc.train.activation_checkpointing = compile_, BACKEND, True
    rc.validate(world)
    ctx = ParallelContext.from_world(1, world)
    torch.manual_seed(0)
    model = GPTModel(rc.model, ctx)
    model.activation_checkpointing = True
    trainer = Trainer(rc)
    trainer.attach(ctx, Engine(model, rc, ctx, lambda s: 1.0))
    g = torch.Generator().manual_seed(1 + rank)

    def batches():
        while True:
            b = torch.randint(0, 64, (MB, SEQ + 1), generator=g)
            yield {"tokens": b[:, :-1], "labels": b[:, 1:], "loss_mask": torch.ones(MB, SEQ)}
    it = batches()
    return [trainer.train_step(it)["loss"] for _ in range(STEPS)], compiled_blocks(model)


def _worker(rank: int, world: int) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from megatron_mhmoe.runtime.engine import init_distributed
    import torch._dynamo
    from tests.moe.test_compile import StaticShapeBackend

    init_distributed(120)
    backend = StaticShapeBackend()
    torch._dynamo.register_backend(backend, name=BACKEND)
    eager, eager_blocks = _losses(rank, world, False)
    torch._dynamo.utils.counters.clear()
    compiled, compiled_blocks = _losses(rank, world, True)
    return {"graphs": backend.graphs, "breaks": dict(torch._dynamo.utils.counters["graph_break"]),
            "eager": eager, "compiled": compiled, "eager_blocks": eager_blocks, "compiled_blocks": compiled_blocks}


def test_compiled_training_matches_eager_at_ep2():
    for r in run_workers(_worker, 2, timeout_s=600):
        assert r["breaks"] == {}, r["breaks"]
        # Block 0 is dense, block 1 MoE (moe_every=2): one graph per block kind, serving every step (no
        # recompilation per step), with no value-dependent size in either.
        assert r["graphs"] == [[], []], r["graphs"]
        assert r["eager_blocks"] == [False, False] and r["compiled_blocks"] == [True, True], r
        assert len(r["compiled"]) == STEPS
        for step, (a, b) in enumerate(zip(r["compiled"], r["eager"])):
            assert abs(a - b) <= LOSS_RTOL * abs(b), f"step {step + 1}: compiled {a} vs eager {b}"
        assert len(set(r["eager"])) > 1  # the steps train (different batches and weights each step)


def test_unknown_compile_backend_is_a_config_error():
    import pytest

    from megatron_mhmoe.runtime.run_config import RunConfig
    rc = RunConfig(model=_model_config())
    rc.train.compile, rc.train.compile_backend, rc.train.seq_len = True, "inductr", SEQ
    with pytest.raises(ValueError, match=r"train.compile_backend='inductr' is not a torch.compile backend; "
                                         r"known: .*'inductor'"):
        rc.validate(1)
    rc.train.compile = False  # the backend is only checked when compiling
    rc.validate(1)
