"""What one all-to-all costs the main job's ranks, measured the way a training step meets it.

The main job's MoE step runs five all-to-alls per MoE layer on the flat path (the counts, the rows there and
back, and both again in the backward) with compute between them. This script times all_to_all_single on
NPROC processes (gloo on CPU, as the throughput benchmark runs) for the main job's payloads, in two ways:
- back to back: the collective alone, the ranks already in step;
- between compute: a fixed matmul before each call (what the layers do between exchanges), so that each
  call also meets the other ranks' lateness, as in training.
For each it prints the mean per call on each rank and the mean of the per-call minimum over the ranks (the
rank that arrived last: what the call costs even when nobody is late), then that cost times the
exchanges of a main-job step, next to the step time the throughput benchmark measured (--step_ms).

    .venv/bin/python benchmarks/collective_latency.py [--nproc 2] [--calls 300] [--step_ms 110]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_mhmoe.parallel.spawn import run_workers  # noqa: E402

# The main job (quickstart preset): 512 tokens per rank x 4 heads x top-2 = 4096 rows of d/h = 32, about
# half of them for the peer at EP=2 (a rank's own rows stay home); the counts are E = 8 int64, E/EP to each.
PAYLOADS = {"counts (8 int64)": (8, 1, torch.int64, True), "rows (2048 x 32 fp32)": (2048, 32, torch.float32, False)}
"""name -> (rows, width, dtype, whether this rank sends itself its share as well)"""
EXCHANGES_PER_STEP = {"counts (8 int64)": 2, "rows (2048 x 32 fp32)": 8}  # 2 MoE layers: 1 + 4 each


def _time_calls(x: torch.Tensor, splits: list, calls: int, compute) -> torch.Tensor:
    out = torch.empty_like(x)
    for _ in range(20):
        dist.all_to_all_single(out, x, splits, splits)
    dist.barrier()
    per_call = []
    for _ in range(calls):
        if compute is not None:
            compute()
        t0 = time.perf_counter()
        dist.all_to_all_single(out, x, splits, splits)
        per_call.append(time.perf_counter() - t0)
    return torch.tensor(per_call, dtype=torch.float64)


def _splits(rows: int, rank: int, world: int, to_self: bool) -> list:
    """rows over the ranks, nothing to this rank itself unless to_self (then world even shares)."""
    if to_self:
        return [rows // world] * world
    return [0 if p == rank else rows // (world - 1) for p in range(world)]


def worker(rank: int, world: int, calls: int) -> dict:
    a = torch.randn(256, 256)
    results = {}
    for name, (rows, width, dtype, to_self) in PAYLOADS.items():
        splits = _splits(rows, rank, world, to_self)
        x = torch.ones(sum(splits), width, dtype=dtype).squeeze(1)
        for mode, compute in (("back to back", None), ("between compute", lambda: a @ a)):
            mine = _time_calls(x, splits, calls, compute)
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            stacked = torch.stack(every) * 1e3  # (ranks, calls) ms
            results[(name, mode)] = dict(mean_per_rank=stacked.mean(1).tolist(),
                                         last_rank=stacked.min(0).values.mean().item())
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--step_ms", type=float, default=0.0,
                    help="the MH-MoE step time to compare with (ms; e.g. 1024 tokens / train_throughput's tokens/s)")
    args = ap.parse_args(argv)
    res = run_workers(worker, args.nproc, args.calls, threads=1)[0]
    print(f"{'payload':24s} {'mode':16s} {'mean per rank (ms)':>22s} {'last rank (ms)':>15s}")
    for (name, mode), r in res.items():
        print(f"{name:24s} {mode:16s} {' / '.join(f'{v:.3f}' for v in r['mean_per_rank']):>22s} "
              f"{r['last_rank']:15.3f}")
    floor = sum(res[(n, "between compute")]["last_rank"] * c for n, c in EXCHANGES_PER_STEP.items())
    mean = sum(max(res[(n, "between compute")]["mean_per_rank"]) * c for n, c in EXCHANGES_PER_STEP.items())
    line = (f"main-job step (2 MoE layers, {sum(EXCHANGES_PER_STEP.values())} all-to-alls): {floor:.1f} ms when "
            f"no rank is late, {mean:.1f} ms at the measured lateness")
    if args.step_ms:
        line += f"; that is {floor / args.step_ms:.0%} - {mean / args.step_ms:.0%} of a {args.step_ms:.0f} ms step"
    print(line)
    print(json.dumps({"bench": "collective_latency", "nproc": args.nproc, "calls": args.calls,
                      "results": {f"{n} | {m}": r for (n, m), r in res.items()}, "step_floor_ms": floor,
                      "step_mean_ms": mean}))


if __name__ == "__main__":
    main()
