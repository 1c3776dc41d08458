"""One GPU per rank (refused with the numbers and the fix when a node has too many ranks), the local
rank/size read from each launcher's variables, and the NCCL timeout setting made before the group forms
(user value kept). NCCL itself is faked: these run on CPU."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from megatron_mhmoe.parallel import devices
from megatron_mhmoe.parallel.devices import (device_for_local_rank, init_process_group, local_rank_from_env,
                                             local_world_size_from_env, nccl_error_defaults)
from megatron_mhmoe.parallel.spawn import free_port, run_workers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
@pytest.mark.parametrize("ranks,gpus", [(1, 1), (2, 4), (4, 4), (8, 8)])
def test_each_rank_gets_its_own_gpu(backend, ranks, gpus):
    got = [device_for_local_rank(r, ranks, gpus, backend) for r in range(ranks)]
    assert got == [f"cuda:{r}" for r in range(ranks)]
    assert len(set(got)) == ranks


def test_gloo_without_gpus_is_cpu():
    assert [device_for_local_rank(r, 4, 0, "gloo") for r in range(4)] == ["cpu"] * 4


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
@pytest.mark.parametrize("ranks,gpus", [(8, 4), (2, 1), (5, 4)])
def test_more_ranks_than_gpus_is_refused_with_the_fix(backend, ranks, gpus):
    for r in range(ranks):  # every rank refuses, not only those past the last GPU
        with pytest.raises(ValueError) as err:
            device_for_local_rank(r, ranks, gpus, backend, cuda_visible_devices="0,1,2,3"[:2 * gpus - 1])
        msg = str(err.value)
        assert f"{ranks} ranks on this node but {gpus} GPUs visible" in msg
        assert f"CUDA_VISIBLE_DEVICES={'0,1,2,3'[:2 * gpus - 1]!r}" in msg
        assert f"at most {gpus} ranks per node" in msg and f"--nproc_per_node={gpus}" in msg
        assert f"GPUS={gpus}" in msg
        assert ("NCCL needs one GPU per rank" in msg) == (backend == "nccl")


def test_nccl_without_gpus_and_bad_numbers():
    with pytest.raises(ValueError, match="nccl backend needs GPUs but none are visible"):
        device_for_local_rank(0, 1, 0, "nccl")
    for rank, size in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="is not one of the"):
            device_for_local_rank(rank, size, 8, "nccl")
    with pytest.raises(ValueError, match="not supported"):
        device_for_local_rank(0, 1, 1, "mpi")


def test_local_rank_from_each_launcher():
    assert local_rank_from_env({"LOCAL_RANK": "3", "WORLD_SIZE": "8"}) == 3
    assert local_rank_from_env({"OMPI_COMM_WORLD_LOCAL_RANK": "2", "WORLD_SIZE": "8"}) == 2
    assert local_rank_from_env({"SLURM_LOCALID": "1"}) == 1
    assert local_rank_from_env({}) == 0
    assert local_rank_from_env({"WORLD_SIZE": "1"}) == 0
    with pytest.raises(ValueError, match="LOCAL_RANK is not set"):
        local_rank_from_env({"RANK": "5", "WORLD_SIZE": "8"})
    with pytest.raises(ValueError, match="LOCAL_RANK='x' is not an integer"):
        local_rank_from_env({"LOCAL_RANK": "x"})


def test_local_world_size_from_each_launcher():
    assert local_world_size_from_env(0, {"LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16"}) == 8  # torchrun
    assert local_world_size_from_env(0, {"LOCAL_SIZE": "4", "WORLD_SIZE": "16"}) == 4  # deepspeed launcher
    assert local_world_size_from_env(0, {"OMPI_COMM_WORLD_LOCAL_SIZE": "2", "WORLD_SIZE": "4"}) == 2
    assert local_world_size_from_env(0, {"WORLD_SIZE": "6", "CROSS_SIZE": "1"}) == 6  # one node
    assert local_world_size_from_env(0, {"WORLD_SIZE": "1"}) == 1
    # Node count unknown: WORLD_SIZE may span nodes, so only the lower bound local_rank + 1 is known.
    assert local_world_size_from_env(5, {"WORLD_SIZE": "16"}) == 6
    assert local_world_size_from_env(5, {}) == 6


def test_blocking_wait_set_when_absent_and_user_value_kept():
    env: dict = {}
    assert nccl_error_defaults(env) == {"TORCH_NCCL_BLOCKING_WAIT": "1"}
    assert env == {"TORCH_NCCL_BLOCKING_WAIT": "1"}
    for user in ({"TORCH_NCCL_BLOCKING_WAIT": "0"}, {"TORCH_NCCL_BLOCKING_WAIT": "1"},
                 {"NCCL_BLOCKING_WAIT": "0"}):  # the old name still counts: torch reads both
        env = dict(user)
        assert nccl_error_defaults(env) == {} and env == user
    # torchrun exports TORCH_NCCL_ASYNC_ERROR_HANDLING=1 to every worker; blocking wait still applies.
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    nccl_error_defaults(env)
    assert env == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_BLOCKING_WAIT": "1"}


@pytest.fixture
def fake_nccl(monkeypatch):
    """CUDA with 4 GPUs and a recording init_process_group; each call notes the environment it saw."""
    calls = {"set_device": [], "init": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(d))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls["init"].append(
        (backend, timeout, os.environ.get("TORCH_NCCL_BLOCKING_WAIT"))))
    for name in ("TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    return calls


def test_init_with_nccl_sets_device_and_blocking_wait_before_the_group(fake_nccl, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert init_process_group(90.0) == "cuda:2"
    assert fake_nccl["set_device"] == [2]
    assert fake_nccl["init"] == [("nccl", datetime.timedelta(seconds=90), "1")]


def test_init_keeps_the_users_blocking_wait(fake_nccl, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "0")
    assert init_process_group(5.0) == "cuda:0"
    assert fake_nccl["init"] == [("nccl", datetime.timedelta(seconds=5), "0")]


def test_init_refuses_too_many_ranks_before_touching_a_gpu(fake_nccl, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(ValueError, match=r"8 ranks on this node but 4 GPUs visible \(CUDA_VISIBLE_DEVICES='0,1,2,3'\)"):
        init_process_group(60.0)
    assert fake_nccl == {"set_device": [], "init": []}
    assert "TORCH_NCCL_BLOCKING_WAIT" not in os.environ


def test_init_without_cuda_is_gloo_on_cpu_and_leaves_nccl_settings(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("no GPU to select"))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls.append((backend, timeout)))
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")  # gloo ranks need no local rank
    assert init_process_group(12.5) == "cpu"
    assert calls == [("gloo", datetime.timedelta(seconds=12.5))]
    assert "TORCH_NCCL_BLOCKING_WAIT" not in os.environ


def test_init_forms_a_real_gloo_group_with_the_timeout():
    code = ("import torch.distributed as dist, torch\n"
            "from megatron_mhmoe.parallel.devices import init_process_group\n"
            "d = init_process_group(37.0)\n"
            "pg = dist.distributed_c10d._get_default_group()\n"
            "print(d, dist.get_backend(), dist.get_world_size(), pg._get_backend(torch.device('cpu')).options._timeout)\n"
            "dist.destroy_process_group()\n")
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["cpu", "gloo", "1", "0:00:37"]


def _never_called(rank, world):
    raise AssertionError("no worker may start")


def test_spawn_refuses_more_nccl_ranks_than_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="4 ranks on this node but 2 GPUs visible"):
        run_workers(_never_called, 4, backend="nccl", timeout_s=30)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="nccl backend needs GPUs"):
        run_workers(_never_called, 1, backend="nccl", timeout_s=30)


def test_module_does_not_import_deepspeed():
    src = open(devices.__file__).read()
    assert "import deepspeed" not in src and "from deepspeed" not in src
