"""The prepared one-GPU check: six checks in order, each one line `CHECK <name> PASS|FAIL <figures>`.

Run it through `bash benchmarks/gpu_check.sh` (which creates or reuses the virtual environment first):

  1 grouped-gemm-selftest  python -m megatron_mhmoe.moe.grouped_ffn --self-test (bf16)
  2 moe-layer-bench        benchmarks/moe_layer.py --preset gpu: TFLOP/s of our layer vs a matmul peak of the run
  3 train-zero1-bf16       the main job, one process, EP=1, ZeRO-1 bf16, 100 steps, checkpoint at step 100
  4 resume-zero1           relaunch to 110 steps: must resume at step 100, losses finite
  5 reshard-zero2          tools/reshard_checkpoint.py step 100 -> ZeRO-2, 10 steps from it; its first loss
                           must match the resume run's loss at the same step (LOSS_REL_TOL)
  6 export-logits          tools/export_checkpoint.py, then the export's logits on the device, finite

Then `GPU CHECK: N passed, M failed`; the exit code is 0 only if every check passed. Each check runs in
child processes with its own timeout, all of them inside one overall budget (--budget-s), so a hang costs
one check, never the lease; a check that times out or fails prints FAIL and the next one runs. Outputs:
--out (default runs/gpu_check/<timestamp>): gpu_check.log (everything printed, child output in full),
one log per child, the three run folders (zero1, zero2 with its resharded checkpoint, export).

--cpu-smoke runs the same sequence on the CPU with tiny sizes (seconds per check): it tests this script's
plumbing, not the GPU. Without it, a machine where torch sees no CUDA device is refused at once.

The module imports only the standard library: torch is used in child processes (and in --logits, the
child of check 6), so a broken install shows up as failed checks, not as a crash of the driver.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECKS = ["grouped-gemm-selftest", "moe-layer-bench", "train-zero1-bf16", "resume-zero1", "reshard-zero2",
          "export-logits"]

LOSS_REL_TOL = 2 ** -7
"""|loss_zero2 - loss_zero1| / |loss_zero1| allowed at the first step after the step-N checkpoint. That
step's forward runs the same bf16 weights on the same batch in both runs (the reshard copies bf16 weights
bit for bit and carries the data position), so only kernel reduction order and atomics differ: a few
elementwise bf16 roundings, which average out over the batch's tokens. 2^-7 is one bf16 eps
(torch.finfo(torch.bfloat16).eps, the relative spacing of bf16 numbers); a wrong weight, a missing
restore or a shifted data position moves the loss by more (on CPU the two losses are equal)."""

# Sizes per mode. Full: a 97M-parameter MH-MoE GPT (d=1024, 8 layers, 4 MoE layers of 8 experts, h=4,
# top-2, dropless), 16 x 512 tokens per step: 5.2 TFLOP per step, so 100 steps are seconds of H200 compute
# and the 150 s timeout is mostly for start-up and the 2.5 GB checkpoint; big enough for torch._grouped_mm,
# ZeRO-1/2 bf16 and an MFU figure that is not pure overhead.
MODES = {
    "full": dict(
        device="cuda", steps=100, extra=10, log_interval=10, eval_iters=5, budget_s=450,
        model=["--model.hidden_size=1024", "--model.num_layers=8", "--model.num_attention_heads=16",
               "--model.ffn_hidden_size=4096", "--model.moe.expert_hidden_size=1024", "--model.vocab_size=4096",
               "--model.max_seq_len=512", "--train.seq_len=512", "--train.micro_batch_size=16",
               "--train.lr=6e-4", "--train.min_lr=6e-5", "--train.warmup_steps=20"],
        bench=["--preset", "gpu"], logits_seq=512,
        timeouts={"probe": 120, "selftest": 90, "bench": 150, "train": 150, "resume": 90, "reshard": 90,
                  "train2": 90, "export": 60, "logits": 60}),
    "cpu-smoke": dict(
        device="cpu", steps=4, extra=2, log_interval=1, eval_iters=2, budget_s=300,
        model=["--train.warmup_steps=2"],
        bench=["--quick"], logits_seq=64,
        timeouts={"probe": 60, "selftest": 60, "bench": 60, "train": 90, "resume": 90, "reshard": 60,
                  "train2": 90, "export": 60, "logits": 60}),
}


# ---------------------------------------------------------------------------------------------- output
class Log:
    """Prints to the console and appends every line, untruncated, to <out>/gpu_check.log."""

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def say(self, text: str, console: str | None = None) -> None:
        with self.lock:
            print(text if console is None else console, flush=True)
            self.file.write(text + "\n")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def fmt(x, spec: str = ".4f") -> str:
    return format(x, spec) if finite(x) else str(x)


def rel(path: str) -> str:
    """Paths inside the repository relative to it (shorter lines), others as they are."""
    return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def tflops(x) -> str:
    """Three significant figures whatever the scale (a CPU smoke run is ~1e-2, an H200 ~1e2)."""
    if not finite(x):
        return str(x)
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def first_error(lines: list[str]) -> str:
    """The line that says what went wrong: our one-line errors, else a Python exception, else the last line."""
    text = [ln.strip() for ln in lines if ln.strip()]
    for ln in text:
        if (ln.startswith("[rank") and " error: " in ln) or ln.startswith(("config error:", "data error:")):
            return ln
    for ln in text:
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return ln
    for ln in text:
        if "FAIL" in ln or ln.startswith("error:"):
            return ln
    return text[-1] if text else "(no output)"


# ---------------------------------------------------------------------------------------------- children
class Runner:
    """Runs child processes in their own process group with a timeout, inside one overall deadline."""

    def __init__(self, log: Log, out: str, env: dict, deadline: float, budget_s: float):
        self.log, self.out, self.env, self.deadline, self.budget_s = log, out, env, deadline, budget_s
        self.count = 0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, tag: str, cmd: list[str], timeout: float) -> dict:
        """{"rc", "lines", "seconds", "timed_out", "skipped"}; output streams to the console (indented,
        truncated), to <out>/<n>-<tag>.log and to gpu_check.log."""
        self.count += 1
        limit = min(timeout, self.left())
        if limit < 5:
            return {"rc": None, "lines": [], "seconds": 0.0, "timed_out": False,
                    "skipped": f"skipped: the overall budget of {self.budget_s:g} s is spent"}
        path = os.path.join(self.out, f"{self.count:02d}-{tag}.log")
        shown = " ".join("<script>" if "\n" in c else rel(c) for c in cmd)
        self.log.say(f"[gpu_check] $ {shown}   (timeout {limit:.0f} s, log {rel(path)})")
        lines: list[str] = []
        t0 = time.monotonic()
        with open(path, "w", buffering=1) as f:
            f.write("$ " + " ".join(cmd) + "\n")
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)

            def pump():
                for raw in proc.stdout:
                    ln = raw.rstrip("\n")
                    lines.append(ln)
                    f.write(ln + "\n")
                    self.log.say("    " + ln, console="    " + (ln if len(ln) <= 200 else ln[:197] + "..."))

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            timed_out = False
            try:
                proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                timed_out = True
                self._kill(proc)
            reader.join(timeout=10)
        seconds = time.monotonic() - t0
        if timed_out:
            self.log.say(f"[gpu_check] {tag}: killed after {seconds:.0f} s (timeout)")
        return {"rc": proc.returncode, "lines": list(lines), "seconds": seconds, "timed_out": timed_out,
                "skipped": None}

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


NOISE = ("USDT:",)
"""Prefixes of lines that say nothing about where a child stopped (torch.profiler's trace markers)."""


def resumed_run_problems(res: dict, recs: list, at, n: int, m: int, failed: str) -> tuple[list, list]:
    """(problems, steps with a non-finite loss) of a run that should resume at step n and log n+1..m."""
    problems = []
    if res["rc"] != 0:
        problems.append(failed)
    if res["rc"] == 0 and at != n:
        problems.append(f"expected 'resumed from ... at step {n}', found {'none' if at is None else at}")
    if res["rc"] == 0 and [int(r["step"]) for r in recs] != list(range(n + 1, m + 1)):
        problems.append(f"metrics.jsonl lacks steps {n + 1}..{m}")
    bad = [int(r["step"]) for r in recs if not finite(r.get("loss"))]
    if bad:
        problems.append(f"non-finite loss at steps {bad[:5]}")
    return problems, bad


def failure(res: dict, what: str = "") -> str:
    """One line for a child that did not succeed."""
    pre = f"{what}: " if what else ""
    if res["skipped"]:
        return pre + res["skipped"]
    if res["timed_out"]:
        said = [ln for ln in res["lines"] if ln.strip().strip("=-") and not ln.startswith(NOISE)]
        return f"{pre}timed out after {res['seconds']:.0f} s; last line: {first_error(said[-1:])}"
    return f"{pre}exit {res['rc']} after {res['seconds']:.0f} s: {first_error(res['lines'])}"


# ---------------------------------------------------------------------------------------------- checks
class Check:
    def __init__(self, args, log: Log, runner: Runner):
        self.a, self.log, self.r = args, log, runner
        self.mode = MODES["cpu-smoke" if args.cpu_smoke else "full"]
        self.dev = self.mode["device"]
        self.py = sys.executable
        self.out = args.out
        self.n, self.extra = self.mode["steps"], self.mode["extra"]
        self.results: list[tuple[str, bool, str]] = []
        self.zero1 = os.path.join(self.out, "zero1")
        self.zero2 = os.path.join(self.out, "zero2")
        self.export = os.path.join(self.out, "export")
        self.ref_losses: dict[int, float] = {}  # step -> loss of the ZeRO-1 resume run
        self.have_ckpt = False
        self.zero2_done = False
        self.matmul_peak: float | None = None  # bf16 TFLOP/s measured by check 2, for a second MFU figure

    def record(self, name: str, ok: bool, text: str) -> None:
        line = f"CHECK {name} {'PASS' if ok else 'FAIL'} {text}"
        self.results.append((name, ok, line))
        self.log.say(line)

    def timeout(self, key: str) -> float:
        return float(self.mode["timeouts"][key]) * self.a.timeout_scale

    # -- helpers for the training runs
    def train_cmd(self, run_dir: str, steps: int, zero: int, save_dir: str, log_interval: int) -> list[str]:
        return [self.py, "-m", "megatron_mhmoe.train", "--config", "megatron_mhmoe/presets/quickstart.yaml",
                "--deepspeed_config", f"ds_configs/zero{zero}_bf16.json", f"--train.zero_stage={zero}",
                "--train.precision=bf16", "--parallel.ep=1", "--parallel.tp=1", f"--run_dir={run_dir}",
                f"--train.save_dir={save_dir}", f"--train.train_steps={steps}", f"--train.save_interval={self.n}",
                f"--train.log_interval={log_interval}", "--train.eval_interval=0",
                f"--train.eval_iters={self.mode['eval_iters']}", "--wandb.mode=offline",
                "--wandb.group=gpu_check", *self.mode["model"]]

    @staticmethod
    def metrics(run_dir: str, first: int = 1, last: int | None = None) -> list[dict]:
        """Training records (with a loss) of metrics.jsonl for steps first..last, the latest record per step."""
        path = os.path.join(run_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return []
        by_step: dict[int, dict] = {}
        with open(path) as f:
            for ln in f:
                try:
                    rec = json.loads(ln)
                except json.JSONDecodeError:
                    continue
                step = int(rec.get("step", -1))
                if "loss" in rec and step >= first and (last is None or step <= last):
                    by_step[step] = rec
        return [by_step[s] for s in sorted(by_step)]

    @staticmethod
    def val_loss(run_dir: str) -> float | None:
        path, val = os.path.join(run_dir, "metrics.jsonl"), None
        if os.path.exists(path):
            with open(path) as f:
                for ln in f:
                    try:
                        val = json.loads(ln).get("val/lm_loss", val)
                    except json.JSONDecodeError:
                        pass
        return val

    @staticmethod
    def resumed_at(lines: list[str]) -> int | None:
        for ln in lines:
            if ln.startswith("resumed from ") and " at step " in ln:
                try:
                    return int(ln.split(" at step ", 1)[1].split()[0])
                except ValueError:
                    return None
        return None

    def step_folder(self, save_dir: str, step: int) -> str:
        return os.path.join(save_dir, f"step_{step:08d}")

    # -- 1
    def selftest(self) -> None:
        name = CHECKS[0]
        res = self.r.run("selftest", [self.py, "-m", "megatron_mhmoe.moe.grouped_ffn", "--self-test",
                                      "--device", self.dev, "--dtype", "bf16"], self.timeout("selftest"))
        line = next((ln.strip() for ln in reversed(res["lines"]) if "self-test:" in ln), None)
        if res["rc"] == 0 and line and ": PASS" in line:
            # device= and dtype= are said once, at the end, as in every other check line
            detail = " ".join(w for w in line.split(": PASS", 1)[1].split() if not w.startswith(("device=", "dtype=")))
            self.record(name, True, f"{detail} (bf16, {self.dev}, {res['seconds']:.0f} s)")
        else:
            self.record(name, False, (line + f" (exit {res['rc']})") if line and res["rc"] is not None
                        and not res["timed_out"] else failure(res))

    # -- 2
    def bench(self) -> None:
        name = CHECKS[1]
        res = self.r.run("moe_layer", [self.py, "benchmarks/moe_layer.py", *self.mode["bench"]], self.timeout("bench"))
        points = []
        for ln in res["lines"]:
            if ln.startswith("JSON "):
                try:
                    points.append(json.loads(ln[5:]))
                except json.JSONDecodeError:
                    pass
        parts, ok = [], bool(points)
        peak = points[0].get("matmul_peak_tflops") if points else None
        for p in points:
            ours = p.get("impl", {}).get("ours", {}).get("tflops")
            ok = ok and finite(ours) and ours > 0 and finite(peak) and peak > 0
            r = p.get("ratios", {})
            extra = ", ".join(f"{k} {r[k]:.2f}" for k in ("ours/floor", "ours/deepspeed") if finite(r.get(k)))
            share = f" = {ours / peak:.2f} of peak" if finite(ours) and finite(peak) and peak else ""
            parts.append(f"{p.get('shape')} E={p.get('E')}: ours {tflops(ours)} TFLOP/s{share}"
                         + (f" ({extra})" if extra else ""))
        if res["rc"] == 0 and ok:
            dtype, device = points[0].get("dtype"), points[0].get("device")
            if dtype == "bf16":
                self.matmul_peak = peak
            self.record(name, True, f"matmul peak {tflops(peak)} TFLOP/s; " + "; ".join(parts)
                        + f" ({dtype}, {device}, {res['seconds']:.0f} s)")
        else:
            why = failure(res) if res["rc"] != 0 else "no finite TFLOP/s in its JSON lines"
            self.record(name, False, why + (f" [{'; '.join(parts)}]" if parts else ""))

    # -- 3
    def train(self) -> None:
        name, n = CHECKS[2], self.n
        save = os.path.join(self.zero1, "checkpoints")
        res = self.r.run("train_zero1", self.train_cmd(self.zero1, n, 1, save, self.mode["log_interval"]),
                         self.timeout("train"))
        recs = self.metrics(self.zero1, 1, n)
        self.have_ckpt = os.path.exists(os.path.join(self.step_folder(save, n), "manifest.json"))
        problems = []
        if res["rc"] != 0:
            problems.append(failure(res))
        elif not recs or int(recs[-1]["step"]) != n:
            problems.append(f"metrics.jsonl has no record of step {n}")
        bad = [int(r["step"]) for r in recs if not finite(r.get("loss"))]
        if bad:
            problems.append(f"non-finite loss at steps {bad[:5]}")
        if res["rc"] == 0 and not self.have_ckpt:
            problems.append(f"no checkpoint {self.step_folder(save, n)}")
        falls = len(recs) >= 2 and finite(recs[0].get("loss")) and finite(recs[-1].get("loss")) \
            and recs[-1]["loss"] < recs[0]["loss"]
        if not self.a.cpu_smoke and recs and not falls:
            problems.append("the loss did not fall over the run")
        figures = self.train_figures(recs, res)
        self.record(name, not problems, "; ".join(problems + ([figures] if figures else [])) if problems else figures)

    def train_figures(self, recs: list[dict], res: dict) -> str:
        if not recs:
            return ""
        first, last = recs[0], recs[-1]
        steady = recs[1:] or recs  # the first window holds start-up and the first step's compilation
        med = lambda key: statistics.median([r[key] for r in steady if finite(r.get(key))]) \
            if any(finite(r.get(key)) for r in steady) else None  # noqa: E731
        tok, a2a, mfu, tfl = med("tokens_per_s"), med("all_to_all_s"), med("mfu"), med("tflops")
        text = (f"loss {fmt(first['loss'])} at step {int(first['step'])} -> {fmt(last['loss'])} at step "
                f"{int(last['step'])}; {fmt(tok, '.0f')} tokens/s, {tflops(tfl)} TFLOP/s, MFU "
                + (f"{100 * mfu:.1f}%" if mfu is not None else "null (no known peak for this device)")
                + (f" ({100 * tfl / self.matmul_peak:.1f}% of check 2's matmul peak)"
                   if finite(tfl) and self.matmul_peak else "")
                + f", all_to_all_s {fmt(a2a, '.4f')} (medians over log windows after the first)")
        return text + f" ({res['seconds']:.0f} s)"

    # -- 4
    def resume(self) -> None:
        name, n, m = CHECKS[3], self.n, self.n + self.extra
        if not self.have_ckpt:
            self.record(name, False, f"skipped: no step-{n} checkpoint from {CHECKS[2]}")
            return
        save = os.path.join(self.zero1, "checkpoints")
        res = self.r.run("resume_zero1", self.train_cmd(self.zero1, m, 1, save, 1), self.timeout("resume"))
        at = self.resumed_at(res["lines"])
        recs = self.metrics(self.zero1, n + 1, m)
        self.ref_losses = {int(r["step"]): r["loss"] for r in recs}
        problems, bad = resumed_run_problems(res, recs, at, n, m, failure(res))
        fig = ""
        if recs:
            fig = (f"resumed at step {at}; loss {fmt(recs[0]['loss'])} at step {int(recs[0]['step'])} -> "
                   f"{fmt(recs[-1]['loss'])} at step {int(recs[-1]['step'])}, "
                   f"{'all finite' if not bad else 'NOT finite'} ({res['seconds']:.0f} s)")
        self.record(name, not problems, "; ".join(problems + ([fig] if fig else [])))

    # -- 5
    def reshard(self) -> None:
        name, n, m = CHECKS[4], self.n, self.n + self.extra
        if not self.have_ckpt:
            self.record(name, False, f"skipped: no step-{n} checkpoint from {CHECKS[2]}")
            return
        src = self.step_folder(os.path.join(self.zero1, "checkpoints"), n)
        save = os.path.join(self.zero2, "checkpoints")
        res = self.r.run("reshard", [self.py, "tools/reshard_checkpoint.py", "--input", src, "--output", save,
                                     "--world-size", "1", "--tp", "1", "--ep", "1", "--zero-stage", "2"],
                         self.timeout("reshard"))
        if res["rc"] != 0:
            self.record(name, False, failure(res, "reshard_checkpoint.py"))
            return
        t_reshard = res["seconds"]
        res = self.r.run("train_zero2", self.train_cmd(self.zero2, m, 2, save, 1), self.timeout("train2"))
        at = self.resumed_at(res["lines"])
        universal = any("restored from the universal" in ln for ln in res["lines"])
        recs = self.metrics(self.zero2, n + 1, m)
        self.zero2_done = res["rc"] == 0 and bool(recs) and int(recs[-1]["step"]) == m
        problems, bad = resumed_run_problems(res, recs, at, n, m, failure(res, "ZeRO-2 run"))
        if res["rc"] == 0 and not universal:
            problems.append("no 'optimizer state restored from the universal per-parameter copy' line")
        fig = ""
        if recs:
            s0 = int(recs[0]["step"])
            l2, l1 = recs[0]["loss"], self.ref_losses.get(s0)
            if not finite(l1):
                problems.append(f"no ZeRO-1 loss at step {s0} to compare with ({CHECKS[3]} did not log it)")
                fig = f"loss {fmt(l2)} at step {s0}"
            else:
                rel = abs(l2 - l1) / max(abs(l1), 1e-12) if finite(l2) else math.inf
                if not rel <= LOSS_REL_TOL:
                    problems.append(f"step-{s0} loss {fmt(l2)} differs from ZeRO-1's {fmt(l1)} by rel {rel:.2e} "
                                    f"> {LOSS_REL_TOL:.2e}")
                fig = (f"step {s0} loss {fmt(l2, '.5f')} vs ZeRO-1 {fmt(l1, '.5f')} (rel {rel:.1e}, tol "
                       f"{LOSS_REL_TOL:.1e})")
                s1 = int(recs[-1]["step"])
                if s1 != s0 and finite(self.ref_losses.get(s1)):
                    fig += (f", step {s1} {fmt(recs[-1]['loss'], '.5f')} vs {fmt(self.ref_losses[s1], '.5f')} "
                            f"(rel {abs(recs[-1]['loss'] - self.ref_losses[s1]) / abs(self.ref_losses[s1]):.1e}, "
                            f"not checked)")
            fig += f"; reshard {t_reshard:.0f} s, run {res['seconds']:.0f} s"
        self.record(name, not problems, "; ".join(problems + ([fig] if fig else [])))

    # -- 6
    def export_logits(self) -> None:
        name = CHECKS[5]
        if self.zero2_done:
            src, what = os.path.join(self.zero2, "checkpoints"), "ZeRO-2 run"
        elif os.path.exists(os.path.join(self.zero1, "checkpoints", "latest")):
            src, what = os.path.join(self.zero1, "checkpoints"), "ZeRO-1 run"
        else:
            self.record(name, False, "skipped: no checkpoint to export")
            return
        res = self.r.run("export", [self.py, "tools/export_checkpoint.py", "--input", src, "--output", self.export],
                         self.timeout("export"))
        if res["rc"] != 0:
            self.record(name, False, failure(res, "export_checkpoint.py"))
            return
        corpus = os.path.join(self.out, "builtin_data", "corpus.jsonl")
        res = self.r.run("logits", [self.py, os.path.abspath(__file__), "--logits", self.export, "--device", self.dev,
                                    "--corpus", corpus, "--seq", str(self.mode["logits_seq"])], self.timeout("logits"))
        info = None
        for ln in res["lines"]:
            if ln.startswith("LOGITS "):
                try:
                    info = json.loads(ln[7:])
                except json.JSONDecodeError:
                    pass
        if res["rc"] != 0 or info is None:
            self.record(name, False, failure(res, "loading the export") if res["rc"] != 0
                        else "no LOGITS line in the output")
            return
        val = self.val_loss(self.zero2 if self.zero2_done else self.zero1)
        text = (f"{what} step {info['step']} export ({info['dtype']}, {info['params'] / 1e6:.1f}M params): logits "
                f"{tuple(info['shape'])} on {info['device']} {'finite' if info['finite'] else 'NOT finite'}, "
                f"max |logit| {fmt(info['max_abs'], '.2f')}, next-token loss {fmt(info['loss'])} on "
                f"{info['tokens']} corpus tokens (run's final validation loss {fmt(val)})")
        self.record(name, bool(info["finite"]) and finite(info["loss"]), text)


# ---------------------------------------------------------------------------------------------- --logits
def logits_main(folder: str, device: str, corpus: str, seq: int) -> int:
    """Check 6's child: load the export with tools/generate.py's loader (megatron_mhmoe/evaluation/generate.py),
    one forward, one JSON line."""
    import torch
    import torch.nn.functional as F
    if REPO not in sys.path:  # run as a script: benchmarks/ is on sys.path, not the checkout
        sys.path.insert(0, REPO)
    from megatron_mhmoe.evaluation import generate

    model, info = generate.load_model(folder, device)
    tok = generate.load_tokenizer(folder, info, None)
    text = ""
    if os.path.exists(corpus):
        with open(corpus) as f:
            for ln in f:
                text = json.loads(ln).get("text", "")
                if len(text) > 8 * seq:
                    break
    ids = tok.encode(text or "def main():\n    return 0\n" * seq)[: min(seq, model.config.max_seq_len) + 1]
    x = torch.tensor([ids[:-1]], dtype=torch.long, device=device)
    y = torch.tensor(ids[1:], dtype=torch.long, device=device)
    with torch.no_grad():
        logits = model(x).logits[..., :model.config.vocab_size]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    ok = bool(torch.isfinite(logits).all())
    loss = float(F.cross_entropy(logits[0].float(), y))
    param = next(model.parameters())
    print("LOGITS " + json.dumps({
        "step": info.get("step"), "shape": list(logits.shape), "device": str(logits.device),
        "dtype": str(param.dtype).replace("torch.", ""), "finite": ok, "max_abs": float(logits.float().abs().max()),
        "loss": loss, "tokens": len(ids) - 1, "params": sum(p.numel() for p in model.parameters())}), flush=True)
    return 0 if ok and math.isfinite(loss) else 1


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="same checks on the CPU, tiny sizes (tests the script)")
    p.add_argument("--out", default=None, help="run folder (default runs/gpu_check/<timestamp>[-cpu-smoke])")
    p.add_argument("--budget-s", type=float, default=None,
                   help="overall time for the checks (default 450 on the GPU, 300 for --cpu-smoke)")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every per-step timeout")
    p.add_argument("--setup-failed", default=None, help=argparse.SUPPRESS)  # from gpu_check.sh: FAIL every check
    p.add_argument("--logits", default=None, help=argparse.SUPPRESS)  # check 6's child: an export folder
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--corpus", default="", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=64, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def summary(log: Log, results: list[tuple[str, bool, str]], smoke: bool) -> int:
    passed = sum(ok for _, ok, _ in results)
    log.say("=" * 80)
    for _, _, line in results:
        log.say(line)
    log.say(f"GPU CHECK: {passed} passed, {len(results) - passed} failed" + (" (cpu-smoke)" if smoke else ""))
    return 0 if passed == len(results) == len(CHECKS) else 1


def probe(runner: Runner, log: Log, smoke: bool, timeout: float) -> str | None:
    """None when the device is usable, else the reason (one line)."""
    code = ("import json, torch\n"
            "d = {'torch': torch.__version__, 'cuda_build': torch.version.cuda, 'cuda': torch.cuda.is_available()}\n"
            "if d['cuda']:\n"
            "    d['gpu'] = torch.cuda.get_device_name(0); d['count'] = torch.cuda.device_count()\n"
            "    d['bf16'] = torch.cuda.is_bf16_supported()\n"
            + ("" if smoke else "import deepspeed\nd['deepspeed'] = deepspeed.__version__\n")
            + "print('PROBE ' + json.dumps(d))\n")
    res = runner.run("probe", [sys.executable, "-c", code], timeout)
    info = next((json.loads(ln[6:]) for ln in res["lines"] if ln.startswith("PROBE ")), None)
    if res["rc"] != 0 or info is None:
        return f"the environment does not work: {failure(res)}"
    log.say(f"[gpu_check] python {sys.executable}: torch {info['torch']} (CUDA build {info['cuda_build']}), "
            + (f"{info['count']} GPU(s), using {info['gpu']}, bf16 {info['bf16']}" if info["cuda"] else "no CUDA")
            + (f", deepspeed {info['deepspeed']}" if "deepspeed" in info else ""))
    if smoke:
        return None
    if not info["cuda"]:
        return (f"torch {info['torch']} in {sys.executable} sees no CUDA device (CUDA build "
                f"{info['cuda_build']}): this check needs one NVIDIA GPU and a CUDA torch")
    if not info["bf16"]:
        return f"{info['gpu']} does not support bf16, which every check here uses"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.logits:
        return logits_main(args.logits, args.device, args.corpus, args.seq)
    mode = MODES["cpu-smoke" if args.cpu_smoke else "full"]
    if args.out is None:
        args.out = os.path.join("runs", "gpu_check", time.strftime("%Y%m%d-%H%M%S")
                                + ("-cpu-smoke" if args.cpu_smoke else ""))
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "gpu_check.log"))
    smoke = args.cpu_smoke
    if args.setup_failed:
        for name in CHECKS:
            log.say(f"CHECK {name} FAIL skipped: environment setup failed: {args.setup_failed}")
        log.say(f"GPU CHECK: 0 passed, {len(CHECKS)} failed" + (" (cpu-smoke)" if smoke else ""))
        return 1
    budget = args.budget_s if args.budget_s is not None else mode["budget_s"]
    log.say(f"[gpu_check] {'CPU smoke run (tests the script, not a GPU)' if smoke else 'GPU check'}: "
            f"{len(CHECKS)} checks, budget {budget:g} s; run folder {rel(args.out)}")
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true", MHMOE_TRACEBACK="1",
               PYTHONPATH=REPO + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    env["DS_ACCELERATOR"] = mode["device"]
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a GPU on the machine must not change what the smoke run tests
    t0 = time.monotonic()
    runner = Runner(log, args.out, env, t0 + budget, budget)
    problem = probe(runner, log, smoke, mode["timeouts"]["probe"])
    if problem:
        log.say(f"gpu_check: {problem}")
        return 2
    check = Check(args, log, runner)
    for i, step in enumerate((check.selftest, check.bench, check.train, check.resume, check.reshard,
                              check.export_logits)):
        log.say(f"[gpu_check] check {i + 1}/{len(CHECKS)}: {CHECKS[i]} ({time.monotonic() - t0:.0f} s elapsed)")
        try:
            step()
        except Exception as e:  # a bug in this script must cost one check, not the rest
            check.record(CHECKS[i], False, f"gpu_check.py raised {type(e).__name__}: {e}")
    log.say(f"[gpu_check] all checks done in {time.monotonic() - t0:.0f} s; full log "
            f"{rel(log.path)}")
    return summary(log, check.results, smoke)


if __name__ == "__main__":
    sys.exit(main())
