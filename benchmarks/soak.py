"""Soak test: a long tiny CPU training run (2 ranks, EP=2) with every rank's resident memory sampled over time.

    python benchmarks/soak.py [--steps 2000] [--warmup-steps 200] [--interval 0.5] [--run-dir DIR]
                              [--max-growth 0.05] [--json OUT.json]

Launches `torchrun --nproc_per_node 2 -m megatron_mhmoe.train` on a tiny MH-MoE model (built from a small
byte-tokenized corpus it prepares in the run dir unless --data-prefix is given), samples the RSS of each rank
(psutil when installed, else VmRSS from /proc/<pid>/status) every --interval seconds, and reports per rank:
RSS once warm-up is over (the first sample at or after --warmup-steps), at the end (the last sample before
the final step), the peak, and the growth between the two. The run is "flat" when every rank grew by at most
--max-growth (5 %). Exit 0 if flat, 1 if not, 2 if the training run failed.

Checkpoints (every --save-interval steps), validation (every --eval-interval) and logging all run during the
soak, so leaks in any of them show up.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_mhmoe.launch.proctree import descendants  # noqa: E402


def rss_bytes(pid: int) -> Optional[int]:
    try:
        import psutil
        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:  # process gone
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def worker_ranks(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes under the launcher (RANK from each one's environment)."""
    out = {}
    for pid in descendants(launcher_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"megatron_mhmoe.train" in cmd and b"RANK" in env:
            out[int(env[b"RANK"])] = pid
    return out


def prepare_data(folder: str) -> str:
    from megatron_mhmoe.data.corpus import build_corpus
    from megatron_mhmoe.data.preprocess import PreprocessConfig, output_prefix_for, preprocess
    prefix = output_prefix_for(os.path.join(folder, "c"), "text")
    if not os.path.exists(prefix + ".idx"):
        corpus = os.path.join(folder, "corpus.jsonl")
        build_corpus(corpus, max_mb=0.3)
        preprocess(PreprocessConfig(inputs=[corpus], output_prefix=os.path.join(folder, "c"), tokenizer_type="byte",
                                    append_eod=True), log=lambda m: None)
    return prefix


def train_args(data: str, run_dir: str, a) -> list[str]:
    return [f"--run_dir={run_dir}", f"--data.data_path=[{data}]", "--model.vocab_size=300", "--model.hidden_size=32",
            "--model.num_layers=2", "--model.ffn_hidden_size=64", "--model.max_seq_len=32",
            "--model.moe.num_experts=4", "--model.moe.expert_hidden_size=32", "--model.moe.num_heads=2",
            "--train.seq_len=32", "--train.micro_batch_size=2", f"--train.train_steps={a.steps}",
            "--train.warmup_steps=20", f"--train.log_interval={a.log_interval}",
            f"--train.eval_interval={a.eval_interval}", "--train.eval_iters=2",
            f"--train.save_interval={a.save_interval}", "--train.keep_last=2", "--train.zero_stage=1",
            "--parallel.ep=2", "--wandb.mode=disabled", "--data.split=90,10,0"]


def soak(a) -> dict:
    from megatron_mhmoe.parallel.spawn import free_port
    run_dir = a.run_dir or tempfile.mkdtemp(prefix="mhmoe-soak-")
    os.makedirs(run_dir, exist_ok=True)
    data = a.data_prefix or prepare_data(run_dir)
    run = os.path.join(run_dir, "run")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("MHMOE_FAULT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "megatron_mhmoe.train"] + train_args(data, run, a)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = {"step": 0, "tail": []}

    def read():
        for line in proc.stdout:
            m = re.match(r"step +(\d+)/", line)
            if m:
                state["step"] = int(m.group(1))
            state["tail"] = (state["tail"] + [line])[-40:]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples: list[dict] = []  # {"t", "step", "rss": {rank: bytes}}
    t0 = time.monotonic()
    while proc.poll() is None:
        ranks = worker_ranks(proc.pid)
        if ranks:
            rss = {r: rss_bytes(pid) for r, pid in sorted(ranks.items())}
            if all(v is not None for v in rss.values()):
                samples.append({"t": round(time.monotonic() - t0, 2), "step": state["step"], "rss": rss})
        time.sleep(a.interval)
    reader.join(10)
    wall = time.monotonic() - t0
    result = {"steps": a.steps, "warmup_steps": a.warmup_steps, "wall_s": round(wall, 1), "returncode": proc.returncode,
              "samples": len(samples), "ranks": {}, "max_growth": a.max_growth}
    if proc.returncode != 0:
        result["error"] = "".join(state["tail"])
        return result
    during = [s for s in samples if 0 < s["step"] < a.steps]
    warm = [s for s in during if s["step"] >= a.warmup_steps]
    if not warm:
        result["error"] = f"no sample after warm-up step {a.warmup_steps} (run too short for --interval?)"
        return result
    first, last = warm[0], warm[-1]
    for r in sorted(first["rss"]):
        w, e = first["rss"][r], last["rss"][r]
        result["ranks"][r] = {"rss_after_warmup_mb": round(w / 2**20, 1), "rss_end_mb": round(e / 2**20, 1),
                              "rss_peak_mb": round(max(s["rss"][r] for s in warm) / 2**20, 1),
                              "growth": round((e - w) / w, 4), "warmup_sample_step": first["step"],
                              "end_sample_step": last["step"]}
    result["flat"] = all(v["growth"] <= a.max_growth for v in result["ranks"].values())
    result["trace"] = [{"t": s["t"], "step": s["step"], **{f"rank{r}_mb": round(v / 2**20, 1)
                                                          for r, v in s["rss"].items()}} for s in samples]
    return result


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--warmup-steps", type=int, default=200, help="RSS is compared from this step on")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--save-interval", type=int, default=250)
    p.add_argument("--max-growth", type=float, default=0.05, help="flat = every rank grew by at most this")
    p.add_argument("--run-dir", default=None, help="where data, checkpoints and metrics go (default: a temp dir)")
    p.add_argument("--data-prefix", default=None, help="an existing byte-tokenized dataset prefix (vocab <= 300)")
    p.add_argument("--json", default=None, help="write the result (with the RSS trace) here")
    a = p.parse_args(argv)
    if a.steps <= a.warmup_steps:
        p.error(f"--steps {a.steps} must exceed --warmup-steps {a.warmup_steps}")
    res = soak(a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if res["returncode"] != 0 or "error" in res:
        print(f"soak: training failed or too short: {res.get('error', '')[-3000:]}", file=sys.stderr)
        return 2
    print(f"soak: {a.steps} steps, 2 ranks (EP=2), {res['wall_s']} s, {res['samples']} RSS samples")
    for r, v in res["ranks"].items():
        print(f"  rank {r}: RSS after warm-up (step {v['warmup_sample_step']}) {v['rss_after_warmup_mb']} MB, "
              f"end (step {v['end_sample_step']}) {v['rss_end_mb']} MB, peak {v['rss_peak_mb']} MB, "
              f"growth {100 * v['growth']:+.2f}%")
    print(f"memory {'flat' if res['flat'] else 'GROWING'} (limit {100 * a.max_growth:.0f}% growth after warm-up)")
    return 0 if res["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
