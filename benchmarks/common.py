"""Shared pieces of the benchmark scripts: interleaved timing, peak memory, DeepSpeed init, tables.

Timing rule: implementations are measured side by side in one process, interleaved (rep r runs every
implementation once, in an order rotated by r), after warm-up reps; we report the median and the spread
(min, max). Machine load then hits all of them alike, and ratios are taken between medians of one run.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ on sys.path, not the repo
    sys.path.insert(0, REPO)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device")
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict[str, Callable[[], None]], reps: int, warmup: int, device: torch.device,
                     before: dict[str, Callable[[], None]] | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each step, `reps` samples each after `warmup` unrecorded rounds.

    before[name] runs untimed ahead of each call (e.g. dropping last step's gradients). clock:
    time.perf_counter (wall) or time.process_time (this process's CPU seconds, user + kernel: on a loaded
    machine it leaves out the time other processes hold the cores; CPU only, one thread to compare with wall).
    """
    names = list(steps)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        rot = r % len(names)
        for name in names[rot:] + names[:rot]:
            if before and name in before:
                before[name]()
            sync(device)
            t0 = clock()
            steps[name]()
            sync(device)
            if r >= warmup:
                samples[name].append(clock() - t0)
    return samples


def summary(xs: list[float]) -> dict:
    med = statistics.median(xs)
    return {"median_ms": med * 1e3, "min_ms": min(xs) * 1e3, "max_ms": max(xs) * 1e3,
            "spread_pct": 100.0 * (max(xs) - min(xs)) / med if med else 0.0}


# ---------------------------------------------------------------------------------------------- memory
MEMORY_NOTE = {
    "cpu": "peak bytes of live torch tensors allocated during one fwd+bwd above those alive before it "
           "(torch.profiler allocation events replayed in time order; excludes allocator caching)",
    "cuda": "torch.cuda.max_memory_allocated during one fwd+bwd minus memory_allocated before it",
}


def peak_step_bytes(step: Callable[[], None], device: torch.device, before: Callable[[], None] | None = None) -> int:
    """Peak additional tensor memory of one call of `step` (see MEMORY_NOTE); `before` runs first, unmeasured
    (it must release what the previous step left, e.g. gradients, or their frees would offset the peak)."""
    if before is not None:
        before()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocs: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))  # frees are negative
        stack.extend(node.children)
    allocs.sort()
    cur = peak = 0
    for _, size in allocs:
        cur += size
        peak = max(peak, cur)
    return peak


# ---------------------------------------------------------------------------------------------- deepspeed
def init_deepspeed_single(device: torch.device) -> None:
    """A 1-process DeepSpeed/torch.distributed world, without DeepSpeed's JIT-compiled CPU ops."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import torch.distributed as dist
    if dist.is_initialized():
        return
    import deepspeed
    from megatron_mhmoe.parallel.spawn import free_port
    from megatron_mhmoe.runtime.engine import skip_cpu_jit_ops
    skip_cpu_jit_ops()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)


# ---------------------------------------------------------------------------------------------- tables
def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec); missing values print as '-'."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
