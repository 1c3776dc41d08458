"""One MoE layer, forward + backward, side by side: ours vs DeepSpeed's MoE vs the compute floor.

For each shape (SMoE h=1, MH-MoE h=heads; the same active expert FLOPs) and each expert count E:
- ours:      megatron_mhmoe.moe.layer.MHMoELayer (single process, softmax gate so DeepSpeed can match it);
- deepspeed: deepspeed.moe.layer.MoE at the same routing shape (N*h sub-tokens of width d/h), same expert
             weights, gate, k, capacity factor; between copies of our head/merge projections for MH-MoE;
- floor:     the same expert GEMMs (+ head/merge projection GEMMs for MH-MoE) on already-permuted rows
             with the per-expert counts ours kept: no routing, no permutation, no combine.
All three run interleaved in one process; we print medians, spread, peak memory, ratios, a table and one
JSON line per point. `--preset gpu` is the large bf16 CUDA configuration with TFLOP/s vs a measured
matmul peak; `--quick` a seconds-long smoke run.

  python benchmarks/moe_layer.py                 # CPU, fp32, E in 8,32,64,256
  python benchmarks/moe_layer.py --quick
  python benchmarks/moe_layer.py --preset gpu    # CUDA, bf16, d=4096, 8 experts, 14336-wide SwiGLU
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import common  # noqa: F401  (puts the repo on sys.path)
from common import (DTYPES, MEMORY_NOTE, init_deepspeed_single, parse_device, peak_step_bytes, print_table,
                    summary, sync, time_interleaved)

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe import capacity as cap
from megatron_mhmoe.moe.grouped_ffn import release_kept_grads
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.moe.router import top_k
from megatron_mhmoe.parallel.context import ParallelContext

PRESETS = {
    "cpu": dict(device="cpu", dtype="fp32", tokens=4096, hidden=256, heads=4, ffn=1024, experts="8,32,64,256",
                act="gelu", reps=7, warmup=2),
    # One thread: on a loaded 2-core machine a 2-thread op waits for both threads to be scheduled.
    "quick": dict(device="cpu", dtype="fp32", tokens=256, hidden=64, heads=4, ffn=128, experts="4,8",
                  act="gelu", reps=3, warmup=1, threads=1),
    # Mixtral-sized expert FLOPs: top-2 of 8 SwiGLU experts 4096 -> 14336 -> 4096.
    "gpu": dict(device="cuda", dtype="bf16", tokens=4096, hidden=4096, heads=4, ffn=14336, experts="8",
                act="swiglu", reps=10, warmup=3),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="defaults for the options below")
    p.add_argument("--quick", action="store_true", help="same as --preset quick (smoke test, seconds)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (never assumed)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="parameter/activation dtype (router stays fp32)")
    p.add_argument("--tokens", type=int, help="tokens N entering the layer")
    p.add_argument("--hidden", type=int, help="model width d")
    p.add_argument("--heads", type=int, help="MH-MoE heads h (sub-token width d/h)")
    p.add_argument("--ffn", type=int, help="expert hidden width (both shapes: same active expert FLOPs)")
    p.add_argument("--experts", help="comma-separated expert counts E")
    p.add_argument("--act", choices=["gelu", "swiglu"], help="expert activation")
    p.add_argument("--top-k", type=int, default=2, help="experts per (sub-)token; DeepSpeed supports 1, 2")
    p.add_argument("--capacity-factor", type=float, default=1.0, help="<= 0: dropless (DeepSpeed pads to max count)")
    p.add_argument("--shapes", default="smoe,mhmoe", help="comma list of smoe (h=1) and mhmoe (h=heads)")
    p.add_argument("--impls", default="ours,deepspeed,floor",
                   help="comma list of ours, deepspeed, floor, loop (ours with the autograd per-expert loop)")
    p.add_argument("--reps", type=int, help="timed repetitions per implementation (median reported)")
    p.add_argument("--warmup", type=int, help="untimed repetitions first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--stats", choices=["off", "deferred", "eager"], default="off",
                   help="our layer's routing statistics (MHMoELayer.stats_mode): 'off' as in the training steps "
                        "that are not logged (all but one per log interval), 'deferred' as in a logged one, "
                        "'eager' the reference that sums them in every forward")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed seconds; cpu: this process's CPU seconds (user + kernel), which leave out "
                        "other processes' time on a loaded machine (CPU device, with --threads 1)")
    p.add_argument("--no-grad-reuse", action="store_true",
                   help="fresh weight-gradient blocks every step (grouped_ffn.REUSE_GRAD_MIN_BYTES = None), as before")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else args.preset]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.expert_list = [int(e) for e in str(args.experts).split(",")]
    args.shape_list = args.shapes.split(",")
    args.impl_list = args.impls.split(",")
    bad = [s for s in args.shape_list if s not in ("smoe", "mhmoe")] + \
          [i for i in args.impl_list if i not in ("ours", "deepspeed", "floor", "loop")]
    if bad:
        p.error(f"unknown shape/impl {bad}")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads} "
                f"({args.hidden} % {args.heads} = {args.hidden % args.heads})")
    if "deepspeed" in args.impl_list and args.top_k not in (1, 2):
        p.error(f"DeepSpeed's MoE supports top-1/top-2 here, got --top-k {args.top_k}")
    return args


def build_ours(args, shape: str, E: int, device, dtype) -> MHMoELayer:
    h = args.heads if shape == "mhmoe" else 1
    cfg = ModelConfig(hidden_size=args.hidden, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=args.top_k, num_heads=h, head_projection=h > 1, expert_hidden_size=args.ffn,
        capacity_factor=args.capacity_factor, expert_activation=args.act, gate="softmax"))
    return MHMoELayer(cfg, ParallelContext.single_process()).to(device=device, dtype=dtype)


def matmul_peak_tflops(device, dtype, n: int, clock=time.perf_counter) -> float:
    """Best of a few square matmuls: the dense peak this run can reach in this dtype (timed by `clock`, as
    the points are, so that %peak compares like with like)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = clock()
        torch.mm(a, b)
        sync(device)
        best = min(best, clock() - t0)
    return 2 * n ** 3 / best / 1e12


def tokens_without_drops(ours: MHMoELayer, x: torch.Tensor) -> torch.Tensor:
    """(N,) True where none of the token's h*k assignments was dropped by capacity."""
    moe, n = ours.moe, x.shape[0]
    x_hat = ours.head(x) if ours.head is not None else x  # (N, d)
    choice = top_k(ours.router(x_hat.reshape(n * moe.num_heads, ours.d_sub)), moe.top_k)  # (N*h, k)
    capacity = cap.expert_capacity(moe.capacity_factor, moe.top_k, n * moe.num_heads, moe.num_experts)
    if capacity == 0:
        return torch.ones(n, dtype=torch.bool, device=x.device)
    counts = cap.local_choice_counts(choice.experts, moe.num_experts)[None]  # (1, k, E)
    keep = cap.capacity_keep(choice.experts, counts, 0, capacity).view(moe.top_k, -1).t()  # (N*h, k)
    return keep.reshape(n, -1).all(1)  # (N,)


class Bench:
    """The three implementations of one point as step functions, with what each must clear before a step."""

    def __init__(self, args, ours: MHMoELayer, x: torch.Tensor, gy: torch.Tensor, aux_grad: torch.Tensor):
        self.args, self.ours, self.x, self.gy, self.aux_grad = args, ours, x, gy, aux_grad
        self.steps, self.before, self.checks = {}, {}, {}

    def zero(self, *mods) -> None:
        self.x.grad = None
        for m in mods:
            m.zero_grad(set_to_none=True)

    def use_loop(self, on: bool) -> None:
        # An instance attribute shadows the class's forward: ours with the autograd per-expert loop.
        if on:
            self.ours.experts.forward = self.ours.experts.forward_loop
        else:
            self.ours.experts.__dict__.pop("forward", None)

    def add_ours(self, name: str, loop: bool) -> None:
        def step():
            self.use_loop(loop)
            y, s = self.ours(self.x)
            torch.autograd.backward([y, s.aux_loss], [self.gy, self.aux_grad])
        self.steps[name], self.before[name] = step, lambda: self.zero(self.ours)

    def add_deepspeed(self, y_ours: torch.Tensor) -> None:
        from ds_moe import DeepSpeedMHMoE
        ours, x = self.ours, self.x
        ds = DeepSpeedMHMoE(ours)
        with torch.no_grad():
            y_ds, _ = ds(x)
            clean = tokens_without_drops(ours, x)  # (N,) bool
        # DeepSpeed renormalises the gates over the choices that survive capacity, we over the top-k
        # before dropping (capacity applies after routing): outputs agree exactly on tokens that lost nothing.
        self.checks["max_abs_diff_vs_deepspeed"] = (y_ds.float() - y_ours.detach().float())[clean].abs().max().item()
        self.checks["tokens_with_drops"] = int((~clean).sum())

        def step():
            y, l_aux = ds(x)
            torch.autograd.backward([y, l_aux], [self.gy, self.aux_grad.to(l_aux.dtype)])
        self.steps["deepspeed"], self.before["deepspeed"] = step, lambda: self.zero(ds)

    def add_floor(self, counts: list[int]) -> None:
        """Already-permuted rows with ours' per-expert counts: only the GEMMs (and the activation) remain."""
        ours, x, N, d = self.ours, self.x, self.x.shape[0], self.x.shape[1]
        n_rows, device, dtype = sum(counts), x.device, x.dtype
        rows = torch.randn(n_rows, ours.d_sub, device=device, dtype=dtype, requires_grad=True)  # (n, d/h)
        g_rows = torch.randn(n_rows, ours.d_sub, device=device, dtype=dtype)
        x_merge = torch.randn(N, d, device=device, dtype=dtype, requires_grad=True)  # merge's input (N, d)

        def floor_zero():
            self.zero(ours)
            rows.grad = x_merge.grad = None

        def step():
            self.use_loop(False)
            outs, grads = [ours.experts(rows, counts)], [g_rows]
            if ours.head is not None:
                outs += [ours.head(x), ours.merge(x_merge)]
                grads += [self.gy, self.gy]
            torch.autograd.backward(outs, grads)
        self.steps["floor"], self.before["floor"] = step, floor_zero

    def measure(self, device) -> dict:
        """Interleaved timings, then each step's peak memory from a fresh allocation: the weight-gradient
        storage kept for reuse (grouped_ffn.REUSE_GRAD_MIN_BYTES) is released first, so that it counts."""
        clock = time.process_time if self.args.clock == "cpu" else time.perf_counter
        samples = time_interleaved(self.steps, self.args.reps, self.args.warmup, device, self.before, clock)
        res = {name: summary(s) for name, s in samples.items()}
        if not self.args.no_memory:
            for name, step in self.steps.items():
                def fresh(name=name):
                    self.before[name]()
                    release_kept_grads()
                res[name]["peak_mb"] = peak_step_bytes(step, device, fresh) / 2 ** 20
        self.use_loop(False)
        return res


def run_point(args, shape: str, E: int, device, dtype, aux_coef: float = 0.01) -> dict:
    torch.manual_seed(args.seed + E)
    ours = build_ours(args, shape, E, device, dtype)
    N, d, h, k = args.tokens, args.hidden, ours.moe.num_heads, args.top_k
    x = torch.randn(N, d, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(N, d, device=device, dtype=dtype)
    bench = Bench(args, ours, x, gy, torch.tensor(aux_coef, device=device))
    ours.stats_mode = "eager"  # this one forward: the kept counts the floor runs on
    y_ours, st = ours(x)
    ours.stats_mode = args.stats
    counts = st.kept.tolist()  # (E,) rows each expert processes after capacity
    n_rows = sum(counts)
    for name in ("ours", "loop"):
        if name in args.impl_list:
            bench.add_ours(name, loop=name == "loop")
    if "deepspeed" in args.impl_list:
        bench.add_deepspeed(y_ours)
    if "floor" in args.impl_list:
        bench.add_floor(counts)
    res = bench.measure(device)
    n_mats = 3 if args.act == "swiglu" else 2
    flops = 3 * 2 * n_rows * ours.d_sub * args.ffn * n_mats  # fwd + 2 backward GEMMs per weight
    if ours.head is not None:
        flops += 3 * 2 * 2 * N * d * d
    for r in res.values():
        r["tflops"] = flops / (r["median_ms"] * 1e-3) / 1e12
    point = dict(bench="moe_layer", shape=shape, E=E, h=h, tokens=N, sub_tokens=N * h, d=d, d_sub=ours.d_sub,
                 ffn=args.ffn, k=k, capacity_factor=args.capacity_factor, act=args.act, dtype=args.dtype,
                 device=str(device), rows=n_rows, floor_flops=flops, impl=res, **bench.checks)
    point["ratios"] = ratios(res)
    return point


def ratios(res: dict) -> dict:
    def r(a, b, key="median_ms"):
        return res[a][key] / res[b][key] if a in res and b in res and res[b].get(key) else None
    return {"ours/floor": r("ours", "floor"), "ours/deepspeed": r("ours", "deepspeed"),
            "deepspeed/floor": r("deepspeed", "floor"), "loop/floor": r("loop", "floor"),
            "mem ours/deepspeed": r("ours", "deepspeed", "peak_mb")}


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = parse_device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_grad_reuse:
        from megatron_mhmoe.moe import grouped_ffn
        grouped_ffn.REUSE_GRAD_MIN_BYTES = None
    if args.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        sys.exit("--clock cpu measures one CPU thread: use it with a CPU device and --threads 1")
    if "deepspeed" in args.impl_list:
        init_deepspeed_single(device)
    peak = matmul_peak_tflops(device, dtype, 8192 if device.type == "cuda" else 2048,
                              time.process_time if args.clock == "cpu" else time.perf_counter)
    print(f"# moe_layer: torch {torch.__version__}, device {device}, {args.dtype}, threads "
          f"{torch.get_num_threads()}, N={args.tokens} d={args.hidden} ffn={args.ffn} k={args.top_k} "
          f"cf={args.capacity_factor} act={args.act}, median of {args.reps} after {args.warmup} warm-up, "
          f"{args.clock} clock, gradient reuse {'off' if args.no_grad_reuse else 'on'}, our statistics {args.stats}, "
          f"matmul peak {peak:.3f} TFLOP/s")
    if not args.no_memory:
        print(f"# memory: {MEMORY_NOTE[device.type]}")
    rows = []
    for shape in args.shape_list:
        for E in args.expert_list:
            point = run_point(args, shape, E, device, dtype)
            point["matmul_peak_tflops"], point["stats_mode"] = peak, args.stats
            print("JSON " + json.dumps(point), flush=True)
            row = dict(shape=shape, E=E, rows=point["rows"])
            for name, r in point["impl"].items():
                row[name] = r["median_ms"]
                row[name + "_spread"] = r["spread_pct"]
                row[name + "_mb"] = r.get("peak_mb")
                row[name + "_pk"] = 100 * r["tflops"] / peak
            row.update(point["ratios"])
            row["diff"] = point.get("max_abs_diff_vs_deepspeed")
            rows.append(row)
    cols = [("shape", "shape", "s"), ("E", "E", "d")]
    for name in args.impl_list:
        cols += [(name, f"{name} ms", ".1f"), (name + "_spread", "±%", ".0f"), (name + "_mb", "MB", ".0f"),
                 (name + "_pk", "%peak", ".0f")]
    cols += [("ours/floor", "ours/floor", ".3f"), ("ours/deepspeed", "ours/ds", ".3f"),
             ("deepspeed/floor", "ds/floor", ".3f"), ("mem ours/deepspeed", "mem ours/ds", ".3f"),
             ("diff", "|y-y_ds|", ".1e")]
    if "loop" in args.impl_list:
        cols.insert(-1, ("loop/floor", "loop/floor", ".3f"))
    print()
    print_table(rows, cols)
    from megatron_mhmoe.moe.grouped_ffn import GroupedFFN
    used = [k for k, ok in GroupedFFN._checked.items() if ok]
    print(f"# expert GEMMs: {'torch._grouped_mm on ' + str(used) if used else 'per-expert torch.mm loop'}"
          + (f" (grouped_mm refused: {GroupedFFN.grouped_mm_failed})" if GroupedFFN.grouped_mm_failed else ""))
    print("# ±%: (max - min) / median over the timed reps; %peak: floor FLOPs / median time vs the matmul peak")


if __name__ == "__main__":
    main()
