#!/usr/bin/env python
"""Expert-scaling sweeps: Dense vs SMoE/X-MoE vs MH-MoE over 8 -> 256 experts (issue 7).

  tools/scaling.py plan   --preset P [--hostfile F | --nodes N --ranks-per-node R] [overrides]
  tools/scaling.py run    --preset P --out DIR [--jobs J] [--only REGEX] [overrides]      (this machine)
  tools/scaling.py launch --preset P --out DIR --hostfile F --master-addr A [--dry-run]  (multi-node)
  tools/scaling.py plot   --out DIR                     (tables, PNGs and the wandb summary run again)

P is a preset name from megatron_mhmoe/presets (cpu_mini_sweep, activation_probe, paper_scaling,
flops_matched_scaling) or a path. Overrides: --sweep.seeds=[1,2] --base.train.train_steps=100 ...
Every run: <DIR>/configs/<name>.yaml, <DIR>/runs/<name>/ (train.log, metrics.jsonl, moe_stats.json,
checkpoints, wandb), one line in <DIR>/results.jsonl. Rerunning the same command skips finished runs
and resumes unfinished ones from their checkpoints. Results: <DIR>/summary.md and <DIR>/plots/*.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mhmoe.scaling import plots, report, results  # noqa: E402
from megatron_mhmoe.scaling.runner import (MultiNode, Sweep, command_line, multinode_command, run_config,  # noqa: E402
                                           write_config)
from megatron_mhmoe.scaling.spec import SweepSpec, load_sweep, sweep_from_dict  # noqa: E402


def _machines(a) -> tuple[int | None, int | None]:
    """(nodes, ranks per node) from --hostfile (validated by the launch parser) or the flags."""
    if getattr(a, "hostfile", None):
        from megatron_mhmoe.launch.hostfile import parse_hostfile
        pool = parse_hostfile(a.hostfile)
        slots = set(pool.values())
        if len(slots) > 1:
            raise ValueError(f"hostfile {a.hostfile}: hosts have different slot counts {dict(pool)}; a sweep "
                             f"places runs on whole nodes of equal size")
        return len(pool), slots.pop()
    return a.nodes, a.ranks_per_node


def _sweep(a, multinode=None) -> Sweep:
    spec, base = load_sweep(a.preset, a.overrides)
    nodes, rpn = _machines(a)
    out = a.out or os.path.join("runs", "sweeps", spec.name)
    return Sweep(spec, base, out, nodes=nodes, ranks_per_node=rpn, multinode=multinode, only=a.only)


def finish(sweep_dir: str, spec: SweepSpec | None = None) -> int:
    """summary.md, plots, wandb summary run from results.jsonl."""
    if spec is None:
        with open(os.path.join(sweep_dir, "sweep.json")) as f:
            spec, _ = sweep_from_dict({"sweep": json.load(f)["spec"], "base": {"model": {}}}, sweep_dir)
    records = [r for r in results.read_jsonl(os.path.join(sweep_dir, results.RESULTS)) if r.get("status") == "ok"]
    if not records:
        print(f"no finished runs in {sweep_dir}/{results.RESULTS}")
        return 1
    table = report.markdown_table(records)
    if any(r.get("variant") for r in records):  # named variants (balancing options ...): their own table
        table += "\n\n## by variant\n\n" + report.balancing_table(records)
    with open(os.path.join(sweep_dir, "summary.md"), "w") as f:
        f.write(f"# sweep {spec.name}\n\n{table}\n")
    print(table)
    images = plots.make_all(sweep_dir, records, spec.reference_ppl)
    for p in images:
        print(f"plot: {p}")
    wdir = plots.log_summary_run(spec, sweep_dir, records, images, table)
    if wdir:
        print(f"wandb summary run: {wdir}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/scaling.py", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("plan", "run", "launch", "plot"):
        p = sub.add_parser(name)
        p.add_argument("--out", default=None, help="sweep folder (default runs/sweeps/<sweep name>)")
        if name == "plot":
            continue
        p.add_argument("--preset", required=True, help="sweep preset name or file")
        p.add_argument("--only", default=None, help="only runs whose name matches this regex")
        p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile: nodes and ranks per node")
        p.add_argument("--nodes", type=int, default=None, help="nodes available (without a hostfile)")
        p.add_argument("--ranks-per-node", type=int, default=None, help="ranks per node (without a hostfile)")
        if name == "run":
            p.add_argument("--jobs", type=int, default=1, help="runs at once on this machine")
            p.add_argument("--no-plots", action="store_true")
        if name == "launch":
            p.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR"))
            p.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", "29500")))
            p.add_argument("--launcher", default=os.environ.get("LAUNCHER", "pdsh"))
            p.add_argument("--dry-run", action="store_true", help="print the plan and one command per run")
    args, rest = ap.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "=" in r and r[2:].split(".")[0] in ("sweep", "base"))]
    if bad:
        ap.error(f"unrecognised argument(s) {bad}: overrides look like --sweep.key=value or --base.section.key=value")
    args.overrides = [r[2:] for r in rest]
    try:
        if args.cmd == "plot":
            if not args.out:
                ap.error("plot needs --out")
            return finish(args.out)
        if args.cmd == "plan":
            sw = _sweep(args)
            print(sw.plan_text())
            return 0
        if args.cmd == "run":
            sw = _sweep(args)
            print(sw.plan_text(), flush=True)
            failed = sw.run(jobs=args.jobs)
            if not args.no_plots:
                finish(sw.dir, sw.spec)
            print(f"sweep folder: {sw.dir}" + (f"; {failed} run(s) FAILED (see failures.jsonl)" if failed else ""))
            return 1 if failed else 0
        # launch (multi-node)
        if not args.hostfile:
            ap.error("launch needs --hostfile")
        if not args.master_addr:
            ap.error("launch needs --master-addr (or MASTER_ADDR): node 0's address on the private network")
        mn = MultiNode(os.path.abspath(args.hostfile), args.master_addr, args.master_port, args.launcher)
        sw = _sweep(args, multinode=mn)
        print(sw.plan_text(), flush=True)
        if args.dry_run:
            done = results.finished_names(sw.dir)
            for run in sw.runs:  # the configs are written so that each printed line can be run as is
                write_config(sw.config_path(run), run_config(run, sw.spec, sw.base, sw.dir))
                env, cmd = multinode_command(run, sw.config_path(run), mn, sw.ranks_per_node)
                print(("# done: " if run.name in done else "") + command_line(env, cmd))
            return 0
        failed = sw.run(jobs=1)
        finish(sw.dir, sw.spec)
        return 1 if failed else 0
    except ValueError as e:
        print(f"scaling: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
