"""Run a function on N local processes in one process group and collect what each rank returns.

For multi-process tests (gloo on loopback) and single-machine benchmarks. Workers are spawned (not
forked) so each has a clean torch; `fn` must be a module-level function. A worker that raises makes the
whole call raise with that rank's traceback; a worker that hangs is killed at the timeout, so a broken
collective fails instead of hanging.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

from megatron_mhmoe.parallel.devices import device_for_local_rank


def free_port() -> int:
    """A TCP port free on loopback now (for MASTER_PORT of a local job)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args, backend: str, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    import torch.distributed as dist
    try:
        if backend == "nccl":
            torch.cuda.set_device(device_for_local_rank(rank, world_size, torch.cuda.device_count(), backend))
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        # gloo sometimes aborts in interpreter teardown (measured on this project's CPU machines); results are already on disk.
        os._exit(0)


def run_workers(fn, world_size: int, *args, timeout_s: float = 240.0, backend: str = "gloo",
                threads: int = 1) -> list:
    """fn(rank, world_size, *args) on world_size processes; returns the per-rank results."""
    if backend == "nccl":  # all ranks on this machine: more of them than GPUs fails here, not in NCCL
        device_for_local_rank(world_size - 1, world_size, torch.cuda.device_count(), backend,
                              cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world_size, port, out_dir, fn, args, backend, threads),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        errors = []
        for r in range(world_size):
            err = os.path.join(out_dir, f"{r}.err")
            if os.path.exists(err):
                with open(err) as f:
                    errors.append(f"--- rank {r} ---\n" + f.read())
        if errors:
            raise RuntimeError("worker(s) failed:\n" + "\n".join(errors))
        if alive:
            raise TimeoutError(f"ranks {alive} still running after {timeout_s:.0f}s (hung collective?)")
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world_size)]
