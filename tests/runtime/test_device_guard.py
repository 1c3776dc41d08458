"""Device mistakes made visible on a CPU-only machine (parallel/host_tensor.py, parallel/comm.check_device).

On CPU every tensor is already "on the device", so these tests give the host a second identity: under the
guard, default-device factory tensors and the data path's batches are host tensors that fail next to device
tensors and in collectives, as CPU tensors do next to CUDA tensors and in NCCL. The whole training path runs
under the guard elsewhere (test_deepspeed_equivalence: the train step at world 1/2/4; test_train_launch and
the reshard tests: MHMOE_DEVICE_GUARD=1 for training, evaluation, save, resume and resharded resume).
Here: the guard's rules, and that the real train step fails when a batch or a collective tensor skips the
engine's device.
"""
from __future__ import annotations

import os

import pytest
import torch

from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.host_tensor import DeviceMismatch, HostTensor, as_host, host_tensor_guard
from tests.distributed import run_workers


def test_host_tensors_work_together_and_refuse_device_tensors():
    w = torch.randn(10, 4)  # made outside the guard: a device tensor
    with host_tensor_guard():
        counts = torch.tensor([3, 1, 2])
        assert isinstance(counts, HostTensor)
        assert counts.cumsum(0).tolist() == [3, 4, 6]  # host bookkeeping is legal
        assert isinstance(counts * 2, HostTensor)
        assert not isinstance(torch.arange(3, device=w.device), HostTensor)
        tokens = as_host(torch.tensor([[1, 2]], device="cpu"))
        with pytest.raises(DeviceMismatch, match="host tensor of shape"):
            torch.nn.functional.embedding(tokens, w)
        assert torch.nn.functional.embedding(tokens.to(w.device), w).shape == (1, 2, 4)
        sums = torch.zeros(4, dtype=torch.float64, device=w.device)
        with pytest.raises(DeviceMismatch):
            sums += torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        sums += torch.tensor(3.0)  # a 0-dim host tensor is a scalar, which CUDA accepts
        sums[:2] = torch.tensor([1.0, 2.0])  # copies across devices are legal
        assert sums.tolist() == [1.0, 2.0, 3.0, 3.0]
    assert not isinstance(torch.zeros(2), HostTensor)  # outside the guard nothing changes


def test_collectives_refuse_host_tensors_even_on_one_process():
    with host_tensor_guard():
        with pytest.raises(DeviceMismatch, match="collective"):
            comm.all_reduce_(torch.zeros(2), None)
        comm.all_reduce_(torch.zeros(2, device="cpu"), None)


def _nccl_check(rank: int, world: int) -> str:
    import torch.distributed as dist
    dist.get_backend = lambda group=None: "nccl"  # a gloo group that reports NCCL's rule
    try:
        comm.all_reduce_(torch.zeros(2), comm.world_group())
    except DeviceMismatch as e:
        return str(e)
    return "no error"


def test_nccl_groups_take_cuda_tensors_only():
    for msg in run_workers(_nccl_check, 2, timeout_s=120):
        assert "NCCL collective, which takes CUDA tensors only" in msg


def _train_step(rank: int, world: int, planted: str) -> str:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from megatron_mhmoe.model.gpt import GPTModel
    from megatron_mhmoe.parallel.context import ParallelContext
    from megatron_mhmoe.runtime import engine as eng_mod
    from megatron_mhmoe.runtime.run_config import RunConfig
    from megatron_mhmoe.runtime.trainer import Trainer
    from tests.runtime.test_deepspeed_equivalence import micro_batches, model_config

    eng_mod.init_distributed(60)
    if planted == "batch_not_moved":
        eng_mod.Engine.to_device = lambda self, batch: batch
    rc = RunConfig(model=model_config("fp32"))
    rc.parallel.ep = world
    rc.train.micro_batch_size, rc.train.global_batch_size, rc.train.seq_len = 2, 2 * world, 16
    rc.validate(world)
    ctx = ParallelContext.from_world(1, world)
    trainer = Trainer(rc, device_guard=True)
    trainer.attach(ctx, eng_mod.Engine(GPTModel(rc.model, ctx), rc, ctx, lambda s: 1.0))
    if planted == "host_loss_sums":
        real = trainer._reduce_mean_over_dp
        trainer._reduce_mean_over_dp = lambda x: real(torch.tensor(x.tolist(), dtype=torch.float64))
    try:
        r = trainer.train_step(micro_batches(ctx, 1, 2))
    except DeviceMismatch as e:
        return f"DeviceMismatch: {e}"
    return f"ok loss {r['loss']:.4f}"


@pytest.mark.parametrize("planted", ["none", "batch_not_moved", "host_loss_sums"])
def test_train_step_fails_when_a_tensor_skips_the_device(planted):
    results = run_workers(_train_step, 2, planted, timeout_s=180)
    if planted == "none":
        assert all(r.startswith("ok loss") for r in results), results
    else:
        assert all(r.startswith("DeviceMismatch") for r in results), results
