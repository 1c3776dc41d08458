"""One device per rank, and the process group joined so that a collective timeout is a Python exception.

Device per rank: NCCL refuses two ranks of one communicator on one GPU, and `rank % device_count()`
silently builds exactly that when a node starts more ranks than it has visible GPUs. The check here
turns it into a ValueError naming the numbers and the launcher setting to change.

Collective timeouts with NCCL (torch 2.4 and later, from ProcessGroupNCCL's source):
- By default (TORCH_NCCL_ASYNC_ERROR_HANDLING=3, "SkipCleanUp") a watchdog thread notices the
  timeout and rethrows it on that thread, which std::terminate()s the process: SIGABRT, exit 134,
  and the main thread never sees an exception, so train.py cannot print its one-line message or exit 4.
  Values 1 (abort the communicator, then tear down) and 3 both kill the process; 0 ignores errors, so a
  dead peer hangs the job forever.
- 2 ("CleanUpOnly") aborts the communicators and lets the process live, but raises nothing on the
  main thread at the timeout: the failure surfaces later, if at all, from whatever next touches the
  aborted communicator or the results it never delivered.
- TORCH_NCCL_BLOCKING_WAIT=1 makes every `work.wait()` (which every synchronous collective calls)
  poll until the collective is done or its timeout passes; on timeout it aborts the communicator and
  raises DistBackendError on the calling (main) thread: "Watchdog caught collective operation timeout:
  WorkNCCL(SeqNum=.., OpType=.., ..., Timeout(ms)=N) ran for M milliseconds before timing out."
  train.py maps that to exit 4 and "collective timed out after Ns (parallel.timeout_s) ...". Blocking
  wait also switches the watchdog's error handling off (recent releases do not start the watchdog).
So init_process_group() sets TORCH_NCCL_BLOCKING_WAIT=1 unless the user set it (or its old name
NCCL_BLOCKING_WAIT). The price: the host waits for each collective to finish, polling every 1 ms,
instead of queueing the kernels after it; the GPU idles for the rest of that millisecond and for the
relaunch of what follows. That costs little on the MoE path, which already syncs the host on the
dispatch counts, but it serializes gradient reductions that DeepSpeed would overlap with backward,
and every small tensor-parallel all-reduce pays the poll. Runs that want that speed back and accept
SIGABRT on a timeout export TORCH_NCCL_BLOCKING_WAIT=0.

Nothing here imports deepspeed: the engine joins DeepSpeed to the group this forms.
"""
from __future__ import annotations

import datetime
import os
from typing import MutableMapping, Optional

BLOCKING_WAIT_VARS = ("TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT")
"""torch reads both names; the first wins when both are set."""


def device_for_local_rank(local_rank: int, local_world_size: int, cuda_count: int, backend: str, *,
                          cuda_visible_devices: Optional[str] = None) -> str:
    """The device of the rank with index `local_rank` among `local_world_size` ranks on this node:
    "cpu" for gloo without GPUs, else "cuda:<local_rank>".

    Raises ValueError when the node has more ranks than visible GPUs (with NCCL, or with gloo on a
    machine whose GPUs the ranks would share), when NCCL is asked for without GPUs, or when the
    numbers contradict each other. `cuda_visible_devices` only feeds the message."""
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend {backend!r} is not supported: use nccl (GPUs) or gloo (CPU)")
    if local_world_size < 1 or not 0 <= local_rank < local_world_size:
        raise ValueError(f"local rank {local_rank} is not one of the {local_world_size} ranks on this node "
                         f"(LOCAL_RANK must be in 0..LOCAL_WORLD_SIZE-1)")
    visible = ("CUDA_VISIBLE_DEVICES unset" if cuda_visible_devices is None
               else f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}")
    if cuda_count == 0:
        if backend == "nccl":
            raise ValueError(f"the nccl backend needs GPUs but none are visible ({visible}): run on GPU nodes, "
                             f"or use gloo on CPU")
        return "cpu"
    if local_world_size > cuda_count:
        how = (f"start at most {cuda_count} ranks per node (GPUS={cuda_count} for launch/train_single_node.sh, "
               f"GPUS_PER_NODE={cuda_count} for launch/train_multi_node.sh, NPROC_PER_NODE={cuda_count} / "
               f"--nproc_per_node={cuda_count} for torchrun)")
        if backend == "nccl":
            raise ValueError(f"{local_world_size} ranks on this node but {cuda_count} GPUs visible ({visible}): "
                             f"NCCL needs one GPU per rank; {how}")
        raise ValueError(f"{local_world_size} ranks on this node but {cuda_count} GPUs visible ({visible}): "
                         f"ranks would share GPUs; {how}, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run "
                         f"gloo on CPU")
    return f"cuda:{local_rank}"


def _env_int(env, names) -> Optional[int]:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not an integer") from None
    return None


def local_rank_from_env(env=None) -> int:
    """This process's index on its node: LOCAL_RANK (torchrun, the deepspeed launcher), else what
    mpirun or srun export. A one-rank job without any of them is local rank 0."""
    env = os.environ if env is None else env
    rank = _env_int(env, ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"))
    if rank is not None:
        return rank
    if (_env_int(env, ("WORLD_SIZE",)) or 1) > 1:
        raise ValueError("LOCAL_RANK is not set in a job of several ranks: start it with torchrun or the "
                         "deepspeed launcher (launch/*.sh), which set LOCAL_RANK for each rank")
    return 0


def local_world_size_from_env(local_rank: int, env=None) -> int:
    """Ranks on this node: LOCAL_WORLD_SIZE (torchrun), LOCAL_SIZE (the deepspeed launcher), the
    mpirun/srun equivalents, else WORLD_SIZE when it is one node (CROSS_SIZE=1 or a single rank). With
    none of those the node holds at least local_rank + 1 ranks: the rank that finds no GPU of its own
    still fails the check."""
    env = os.environ if env is None else env
    size = _env_int(env, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"))
    if size is None:
        world = _env_int(env, ("WORLD_SIZE",))
        if world is not None and (world == 1 or _env_int(env, ("CROSS_SIZE",)) == 1):
            size = world
    return max(size or 0, local_rank + 1)


def nccl_error_defaults(env: Optional[MutableMapping[str, str]] = None) -> dict:
    """Make an NCCL collective timeout raise on the calling thread (see the module docstring): sets
    TORCH_NCCL_BLOCKING_WAIT=1 unless either of its names is already set. Returns what it set."""
    env = os.environ if env is None else env
    if any(name in env for name in BLOCKING_WAIT_VARS):
        return {}
    env["TORCH_NCCL_BLOCKING_WAIT"] = "1"
    return {"TORCH_NCCL_BLOCKING_WAIT": "1"}


def init_process_group(timeout_s: float) -> str:
    """Join the job's process group (env:// rendezvous from the launcher) with collectives timing out
    after `timeout_s` seconds; returns this rank's device ("cpu" or "cuda:<local rank>").

    nccl when CUDA is available, else gloo. The device check runs before anything connects, so a node
    with too many ranks fails at once with the fix rather than inside NCCL."""
    import torch
    import torch.distributed as dist
    if not torch.cuda.is_available():
        backend, device = "gloo", "cpu"  # every rank on the CPU: its local rank does not matter
    else:
        backend = "nccl"
        local_rank = local_rank_from_env()
        device = device_for_local_rank(local_rank, local_world_size_from_env(local_rank),
                                       torch.cuda.device_count(), backend,
                                       cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    if dist.is_initialized():
        return device
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        nccl_error_defaults()  # ProcessGroupNCCL reads it when the group is built, so before that
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device
