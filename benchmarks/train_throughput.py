"""Training tokens/s of the main job (MH-MoE) and of a dense GPT with the same active FLOPs, side by side.

Both models are launched the same way (torchrun, NPROC CPU processes, the quickstart preset and data);
the dense model's FFN width is chosen so that its forward FLOPs per token equal the MH-MoE model's
(sizing.flops_per_token, attention included). Runs alternate (MoE, dense, MoE, dense, ...) so that
machine noise hits both alike; each run's tokens/s comes from its summary.json, and the table gives
medians, spread and the ratio.

    .venv/bin/python benchmarks/train_throughput.py --steps 60 --reps 3

--breakdown instead profiles --breakdown_steps steps of each model (torch.profiler, rank 0; the ranges of
megatron_mhmoe/step_spans.py, aggregated by megatron_mhmoe/runtime/step_breakdown.py) and prints where
each spends its time per step, forward + backward, and the difference (docs/step-throughput.md):

    .venv/bin/python benchmarks/train_throughput.py --breakdown

--compile instead compares eager with train.compile=true:

    .venv/bin/python benchmarks/train_throughput.py --compile --steps 40 --reps 1   # eager vs train.compile
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_mhmoe.moe import sizing  # noqa: E402
from megatron_mhmoe.parallel.spawn import free_port  # noqa: E402
from megatron_mhmoe.runtime.run_config import RunConfig, load_config_file, merged_dict, program_defaults  # noqa: E402

PRESET = os.path.join(ROOT, "megatron_mhmoe", "presets", "quickstart.yaml")


def equal_flops_dense_ffn(cfg: RunConfig) -> tuple[int, int, int]:
    """(dense ffn width, MoE model FLOPs/token, dense model FLOPs/token): the closest width in steps of 8."""
    target = sizing.flops_per_token(cfg.model, cfg.train.seq_len)

    def flops(width: int) -> int:
        dense = dataclasses.replace(cfg.model, moe=None, ffn_hidden_size=width)
        return sizing.flops_per_token(dense, cfg.train.seq_len)

    width = min(range(8, 16 * cfg.model.hidden_size + 1, 8), key=lambda w: abs(flops(w) - target))
    return width, target, flops(width)


def run_once(kind: str, args: argparse.Namespace, dense_ffn: int, workdir: str, rep: int, extra=()) -> float:
    run_dir = os.path.join(workdir, f"{kind}_{rep}")
    overrides = [f"--run_dir={run_dir}", f"--train.train_steps={args.steps}", "--train.save_interval=0",
                 "--train.eval_interval=0", "--train.eval_iters=1", f"--train.log_interval={args.steps}",
                 "--wandb.mode=disabled", f"--parallel.ep={args.nproc if kind == 'mhmoe' else 1}"]
    if kind == "dense":
        overrides += ["--model.moe=null", f"--model.ffn_hidden_size={dense_ffn}"]
    overrides += list(extra)  # later overrides win (compare_compiled: log interval, compile)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "megatron_mhmoe.train", "--config", PRESET] + overrides
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} run {rep} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "summary.json")) as f:
        return float(json.load(f)["tokens_per_s"])


def breakdown_once(kind: str, args: argparse.Namespace, dense_ffn: int, workdir: str) -> dict:
    """runtime/step_breakdown.aggregate() of one model's profiled steps (unlogged steps, after a warmup)."""
    out = os.path.join(workdir, f"breakdown_{kind}.json")
    warmup = 3
    overrides = [f"--run_dir={os.path.join(workdir, 'breakdown_' + kind)}",
                 f"--train.train_steps={warmup + 2 * args.breakdown_steps}", "--train.save_interval=0",
                 "--train.eval_interval=0", "--wandb.mode=disabled",
                 f"--parallel.ep={args.nproc if kind == 'mhmoe' else 1}"]
    if kind == "dense":
        overrides += ["--model.moe=null", f"--model.ffn_hidden_size={dense_ffn}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "megatron_mhmoe.runtime.step_breakdown",
           "--out", out, "--steps", str(args.breakdown_steps), "--warmup", str(warmup), "--config", PRESET] + overrides
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} breakdown failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def print_breakdown(args: argparse.Namespace, dense_ffn: int) -> None:
    from megatron_mhmoe.runtime.step_breakdown import format_table
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        results = {kind: breakdown_once(kind, args, dense_ffn, workdir) for kind in ("mhmoe", "dense")}
    print(f"\nms per training step on rank 0 ({args.breakdown_steps} profiled steps, profiler overhead included; "
          f"(bwd): the backward's part)")
    print(format_table(results))
    timed = {k: r["timed"] for k, r in results.items()}
    print("unprofiled steps, rank 0: " + "; ".join(f"{k} wall {t['wall_s'] * 1e3:.1f} ms, CPU {t['cpu_s'] * 1e3:.1f} ms"
                                               for k, t in timed.items())
          + f"; mhmoe / dense throughput by CPU time {timed['dense']['cpu_s'] / timed['mhmoe']['cpu_s']:.3f}, "
            f"by wall time {timed['dense']['wall_s'] / timed['mhmoe']['wall_s']:.3f}")
    print(json.dumps({"bench": "train_breakdown", "steps": args.breakdown_steps, "nproc": args.nproc,
                      "dense_ffn": dense_ffn, "us_per_step": results}))


def steady_tokens_per_s(run_dir: str) -> float:
    """Tokens/s over the log windows after the first (metrics.jsonl): the first holds torch.compile's
    compilation (and eager's warm-up), which is not the speed of training."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"tokens_per_s"' in line]
    later = rows[1:] or rows
    return statistics.mean(r["tokens_per_s"] for r in later)


def compare_compiled(args: argparse.Namespace, dense_ffn: int, workdir: str) -> dict:
    """--compile: eager vs train.compile=true for both models, alternating, steady-state tokens/s
    (log every --compile-window steps, the first window left out)."""
    window = max(1, args.compile_window)
    if args.steps < 2 * window:
        sys.exit(f"--compile needs --steps >= 2 x --compile-window = {2 * window} (the first window compiles)")
    out: dict[str, list[float]] = {}
    for rep in range(args.reps):
        for kind in ("mhmoe", "dense"):
            for compiled in (False, True):
                extra = [f"--train.log_interval={window}", f"--train.compile={str(compiled).lower()}",
                         f"--train.compile_backend={args.compile_backend}"]
                if kind == "mhmoe" and args.device_counts:
                    extra += ["--model.moe.capacity_factor=1.25", "--model.moe.a2a_device_counts=true"]
                name = f"{kind}_{'compiled' if compiled else 'eager'}"
                run_once(kind, args, dense_ffn, workdir, f"{rep}_{name}", extra)
                tok_s = steady_tokens_per_s(os.path.join(workdir, f"{kind}_{rep}_{name}"))
                out.setdefault(name, []).append(tok_s)
                print(f"  rep {rep + 1}/{args.reps} {name:16s} {tok_s:9.0f} tokens/s (steady)", flush=True)
    med = {k: statistics.median(v) for k, v in out.items()}
    print(f"\n{'model':16s} {'median tok/s':>13s} {'min':>9s} {'max':>9s}")
    for k, v in out.items():
        print(f"{k:16s} {med[k]:13.0f} {min(v):9.0f} {max(v):9.0f}")
    for kind in ("mhmoe", "dense"):
        print(f"{kind}: compiled / eager tokens/s {med[kind + '_compiled'] / med[kind + '_eager']:.3f}")
    print(f"MH-MoE / dense: eager {med['mhmoe_eager'] / med['dense_eager']:.3f}, "
          f"compiled {med['mhmoe_compiled'] / med['dense_compiled']:.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    ap.add_argument("--reps", type=int, default=3, help="runs per model, alternating (default 3)")
    ap.add_argument("--nproc", type=int, default=2, help="processes per run; MH-MoE uses EP=nproc (default 2)")
    ap.add_argument("--workdir", default=None, help="where run dirs go (default: a temporary folder)")
    ap.add_argument("--breakdown", action="store_true", help="profile where each model's step time goes instead")
    ap.add_argument("--breakdown_steps", type=int, default=10, help="profiled steps per model (default 10)")
    ap.add_argument("--compile", action="store_true",
                    help="instead: eager vs train.compile=true for both models (steady-state tokens/s)")
    ap.add_argument("--compile-backend", default="inductor", help="train.compile_backend for --compile")
    ap.add_argument("--compile-window", type=int, default=10,
                    help="--compile: steps per log window; the first (compilation) is left out (default 10)")
    ap.add_argument("--device-counts", action="store_true",
                    help="--compile: MH-MoE with capacity 1.25 and a2a_device_counts (its graph-break-free mode)")
    args = ap.parse_args()
    if args.steps < 2 or args.reps < 1 or args.nproc < 1:
        ap.error("--steps must be >= 2, --reps and --nproc >= 1")

    cfg = RunConfig.from_dict(merged_dict(program_defaults(), load_config_file(PRESET), []))
    dense_ffn, moe_flops, dense_flops = equal_flops_dense_ffn(cfg)
    print(f"MH-MoE: {moe_flops / 1e6:.3f} MFLOP/token forward; dense with ffn {dense_ffn}: "
          f"{dense_flops / 1e6:.3f} MFLOP/token ({100 * (dense_flops / moe_flops - 1):+.1f}%)", flush=True)
    if args.breakdown:
        print_breakdown(args, dense_ffn)
        return
    if args.compile:
        with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
            out = compare_compiled(args, dense_ffn, workdir)
        print(json.dumps({"bench": "train_throughput_compile", "steps": args.steps, "nproc": args.nproc,
                          "backend": args.compile_backend, "device_counts": args.device_counts, "tokens_per_s": out}))
        return
    results: dict[str, list[float]] = {"mhmoe": [], "dense": []}
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for rep in range(args.reps):
            for kind in ("mhmoe", "dense"):
                tok_s = run_once(kind, args, dense_ffn, workdir, rep)
                results[kind].append(tok_s)
                print(f"  rep {rep + 1}/{args.reps} {kind:6s} {tok_s:9.0f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n{'model':8s} {'median tok/s':>13s} {'min':>9s} {'max':>9s}")
    for k, v in results.items():
        print(f"{k:8s} {med[k]:13.0f} {min(v):9.0f} {max(v):9.0f}")
    ratio = med["mhmoe"] / med["dense"]
    print(f"MH-MoE / dense tokens/s at equal active FLOPs: {ratio:.3f}")
    print(json.dumps({"bench": "train_throughput", "steps": args.steps, "nproc": args.nproc, "dense_ffn": dense_ffn,
                      "moe_flops_per_token": moe_flops, "dense_flops_per_token": dense_flops,
                      "tokens_per_s": results, "ratio_mhmoe_over_dense": ratio}))


if __name__ == "__main__":
    main()
