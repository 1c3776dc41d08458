"""Run a sweep: write each run's config, launch it, record it in results.jsonl, then plot.

Per run (in plan order, `jobs` at a time on one machine):
  1. skip it when results.jsonl already records it as finished (status ok);
  2. write <sweep>/configs/<name>.yaml: the base run config + the matched model + seed + EP + wandb
     group/name/tags + run_dir <sweep>/runs/<name> (checkpoints inside it, so a rerun resumes: train.py
     loads <run_dir>/checkpoints/latest by itself);
  3. launch it: world 1 -> `python -m megatron_mhmoe.train --config F` (one process, no launcher);
     world > 1 on this machine -> `python -m torch.distributed.run --nproc_per_node W ...`;
     multi-node -> launch/train_multi_node.sh with HOSTFILE / NUM_NODES / GPUS_PER_NODE (it runs
     launch_check first); output goes to <run_dir>/train.log;
  4. read metrics.jsonl / moe_stats.json and append one line to results.jsonl.
A failed run is reported (and listed in failures.jsonl) and the sweep goes on; the exit code says so.
"""
from __future__ import annotations

import concurrent.futures as cf
import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_mhmoe import atomic
from megatron_mhmoe.config import to_dict
from megatron_mhmoe.parallel.spawn import free_port
from megatron_mhmoe.scaling import matching, results
from megatron_mhmoe.scaling.plan import RunPlan, build_plan, format_plan
from megatron_mhmoe.scaling.spec import SweepSpec, spec_to_dict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RunFn = Callable[[RunPlan, str, str], int]
"""(run, config_path, log_path) -> exit code. The default launches train.py; tests pass a stub."""


@dataclass
class MultiNode:
    """How to reach the cluster (launch/train_multi_node.sh's environment)."""
    hostfile: str
    master_addr: str
    master_port: int = 29500
    launcher: str = "pdsh"


def run_config(run: RunPlan, spec: SweepSpec, base: dict, sweep_dir: str) -> dict:
    """The run config train.py gets (a plain dict; YAML on disk)."""
    from megatron_mhmoe.runtime.run_config import apply_overrides
    cfg = copy.deepcopy(base)
    run_dir = os.path.join(sweep_dir, "runs", run.name)
    cfg["model"] = to_dict(run.model)
    cfg.setdefault("parallel", {})
    cfg["parallel"].update(tp=1, ep=run.placement.ep)
    t = cfg.setdefault("train", {})
    t.update(seed=run.seed, save_dir=os.path.join(run_dir, "checkpoints"), resume=True)
    cfg["run_dir"] = run_dir
    cfg["wandb"] = {**(cfg.get("wandb") or {}), "project": spec.wandb_project, "group": spec.name,
                    "name": run.name, "tags": list(run.tags), "mode": spec.wandb_mode}
    apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in sorted(run.overrides.items())])  # the variant's
    apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in sorted(run.vary.items())])
    return cfg


def write_config(path: str, cfg: dict) -> None:
    import yaml
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic.atomic_open(path, "w") as f:
        f.write("# written by tools/scaling.py; train with: python -m megatron_mhmoe.train --config THIS_FILE\n")
        yaml.safe_dump(cfg, f, sort_keys=False)


def local_command(run: RunPlan, config_path: str, python: str = sys.executable) -> list[str]:
    if run.placement.world == 1:
        return [python, "-m", "megatron_mhmoe.train", "--config", config_path]
    return [python, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(run.placement.world),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "megatron_mhmoe.train",
            "--config", config_path]


def multinode_command(run: RunPlan, config_path: str, mn: MultiNode, ranks_per_node: int) -> tuple[dict, list]:
    """(extra environment, command) for launch/train_multi_node.sh."""
    env = {"HOSTFILE": mn.hostfile, "MASTER_ADDR": mn.master_addr, "MASTER_PORT": str(mn.master_port),
           "LAUNCHER": mn.launcher, "NUM_NODES": str(run.placement.nodes), "GPUS_PER_NODE": str(ranks_per_node)}
    return env, [os.path.join(REPO, "launch", "train_multi_node.sh"), "--config", config_path]


def command_line(env: dict, cmd: list) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(c) for c in cmd])


class Sweep:
    """A planned sweep in a folder. `run()` executes what results.jsonl does not yet hold."""

    def __init__(self, spec: SweepSpec, base: dict, sweep_dir: str, *, nodes: Optional[int] = None,
                 ranks_per_node: Optional[int] = None, multinode: Optional[MultiNode] = None,
                 only: Optional[str] = None, log: Callable[[str], None] = print):
        import re
        self.spec, self.base, self.dir = spec, copy.deepcopy(base), os.path.abspath(sweep_dir)
        self.ranks_per_node = ranks_per_node or spec.ranks_per_node
        self.multinode = multinode
        self.runs = build_plan(spec, self.base, nodes=nodes, ranks_per_node=self.ranks_per_node)
        if only:
            pat = re.compile(only)
            self.runs = [r for r in self.runs if pat.search(r.name)]
        self.log = log
        self.seq_len = int((self.base.get("train") or {}).get("seq_len", 64))

    # ------------------------------------------------------------------ pieces
    def config_path(self, run: RunPlan) -> str:
        return os.path.join(self.dir, "configs", run.name + ".yaml")

    def plan_text(self) -> str:
        return format_plan(self.runs, self.seq_len)

    def prepare_data(self) -> None:
        """Built-in corpus once, before any run starts (parallel runs would race to build it)."""
        data = self.base.setdefault("data", {})
        if data.get("data_path"):
            return
        from megatron_mhmoe.data.builtin_data import prepare_builtin_data
        vocab = int(self.base["model"].get("vocab_size", 2048))
        prefix, tok = prepare_builtin_data(os.path.join(self.dir, "builtin_data"), vocab_size=min(vocab, 4096))
        data.update(data_path=[prefix], tokenizer_model=tok)

    def record(self, run: RunPlan, cfg: dict, wall_s: float) -> dict:
        t, pl = cfg["train"], run.placement
        gbs = int(t.get("global_batch_size") or 0) or \
            int(t.get("micro_batch_size", 4)) * int(t.get("grad_accum_steps", 1)) * pl.world
        rec = {"name": run.name, "status": "ok", "sweep": self.spec.name, "kind": run.kind, "experts": run.experts,
               "h": run.h, "mode": run.mode, "seed": run.seed, "vary": run.vary, "tags": run.tags,
               "variant": run.variant, "variant_overrides": run.overrides,
               "nodes": pl.nodes, "world": pl.world, "ep": pl.ep, "experts_per_rank": pl.experts_per_rank,
               "tokens": int(t["train_steps"]) * gbs * self.seq_len, "train_steps": int(t["train_steps"]),
               "wall_s": round(wall_s, 1), "run_dir": cfg["run_dir"], "config_path": self.config_path(run),
               "match": {k: v for k, v in run.match.items() if isinstance(v, (int, float, str))},
               "config": cfg}
        rec.update(matching.describe(run.model, self.seq_len))
        rec.update(results.read_run(cfg["run_dir"]))
        return rec

    def launch(self, run: RunPlan, config_path: str, log_path: str, threads: int) -> int:
        env = dict(os.environ)
        if "DS_ACCELERATOR" not in env and not shutil.which("nvidia-smi"):
            env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("WANDB_MODE", "offline")
        env["OMP_NUM_THREADS"] = str(threads)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if self.multinode is not None:
            extra, cmd = multinode_command(run, config_path, self.multinode, self.ranks_per_node)
            env.update(extra)
        else:
            cmd = local_command(run, config_path)
        with open(log_path, "ab") as f:
            f.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            f.flush()
            return subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode

    # ------------------------------------------------------------------ the loop
    def run(self, jobs: int = 1, run_fn: Optional[RunFn] = None, prepare: bool = True) -> int:
        """Execute the missing runs; returns the number of failed runs."""
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "sweep.json"), "w") as f:
            json.dump({"spec": spec_to_dict(self.spec), "base": self.base}, f, indent=1)
        done = results.finished_names(self.dir)
        todo = [r for r in self.runs if r.name not in done]
        self.log(f"sweep {self.spec.name}: {len(self.runs)} runs, {len(self.runs) - len(todo)} already in "
                 f"{os.path.join(self.dir, results.RESULTS)}, {len(todo)} to run ({jobs} at a time)")
        if not todo:
            return 0
        if prepare and run_fn is None and self.multinode is None:
            self.prepare_data()
        threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
        t_start = time.time()

        def one(run: RunPlan) -> tuple[RunPlan, dict, int, float]:
            cfg = run_config(run, self.spec, self.base, self.dir)
            path = self.config_path(run)
            write_config(path, cfg)
            os.makedirs(cfg["run_dir"], exist_ok=True)
            log_path = os.path.join(cfg["run_dir"], "train.log")
            t0 = time.time()
            fn = run_fn or (lambda r, p, lp: self.launch(r, p, lp, max(1, threads // r.placement.world)))
            code = fn(run, path, log_path)
            return run, cfg, code, time.time() - t0

        state = {"finished": 0, "failed": 0}

        def handle(fut) -> None:
            run, cfg, code, wall = fut.result()
            state["finished"] += 1
            n = state["finished"]
            eta = (time.time() - t_start) / n * (len(todo) - n)
            log_file = os.path.join(cfg["run_dir"], "train.log")
            if code != 0:
                state["failed"] += 1
                with open(os.path.join(self.dir, "failures.jsonl"), "a") as f:
                    f.write(json.dumps({"name": run.name, "exit_code": code, "time": time.time(),
                                        "log": log_file}) + "\n")
                self.log(f"  FAILED {run.name} (exit {code}) after {wall:.0f} s: see {log_file}")
                return
            rec = self.record(run, cfg, wall)
            results.append_result(self.dir, rec)
            self.log(f"  done {run.name} in {wall:.0f} s: val ppl {_fmt(rec.get('val_ppl'))}, activation "
                     f"{_fmt(rec.get('activation_ratio'), '.3f')}, effective experts "
                     f"{_fmt(rec.get('effective_experts'), '.1f')}, {_fmt(rec.get('tokens_per_s'), '.0f')} tok/s "
                     f"[{n}/{len(todo)}, ~{eta / 60:.1f} min left]")

        with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            pending: set = set()
            for i, run in enumerate(todo, 1):
                while len(pending) >= max(1, jobs):  # record finished runs as soon as they finish
                    done_now, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for fut in done_now:
                        handle(fut)
                pl = run.placement
                self.log(f"[{i}/{len(todo)}] start {run.name}: E={run.model.moe.num_experts if run.model.moe else 0} "
                         f"nodes {pl.nodes} world {pl.world} EP {pl.ep} ({pl.experts_per_rank} experts/rank)")
                pending.add(pool.submit(one, run))
            for fut in cf.as_completed(pending):
                handle(fut)
        failed = state["failed"]
        return failed


def _fmt(v, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)
