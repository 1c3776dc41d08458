"""What each tools/scaling.py subcommand does (plan, run, launch, plot), given its parsed options."""
from __future__ import annotations

import json
import os
from typing import Optional

from megatron_mhmoe.scaling import plots, report, results
from megatron_mhmoe.scaling.runner import MultiNode, Sweep, command_line, multinode_command, run_config, write_config
from megatron_mhmoe.scaling.spec import SweepSpec, load_sweep, sweep_from_dict


def machines(hostfile: Optional[str], nodes: Optional[int], ranks_per_node: Optional[int]):
    """(nodes, ranks per node) from a hostfile (validated by the launch parser) or the flags."""
    if hostfile:
        from megatron_mhmoe.launch.hostfile import parse_hostfile
        pool = parse_hostfile(hostfile)
        slots = set(pool.values())
        if len(slots) > 1:
            raise ValueError(f"hostfile {hostfile}: hosts have different slot counts {dict(pool)}; a sweep "
                             f"places runs on whole nodes of equal size")
        return len(pool), slots.pop()
    return nodes, ranks_per_node


def open_sweep(a, multinode: Optional[MultiNode] = None) -> Sweep:
    """The Sweep of parsed options (--preset, overrides, --out, --hostfile/--nodes/--ranks-per-node, --only)."""
    spec, base = load_sweep(a.preset, a.overrides)
    nodes, rpn = machines(getattr(a, "hostfile", None), a.nodes, a.ranks_per_node)
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


def run_here(a) -> int:
    """`run`: every run of the plan on this machine, --jobs at once, then the tables and plots."""
    sw = open_sweep(a)
    print(sw.plan_text(), flush=True)
    failed = sw.run(jobs=a.jobs)
    if not a.no_plots:
        finish(sw.dir, sw.spec)
    print(f"sweep folder: {sw.dir}" + (f"; {failed} run(s) FAILED (see failures.jsonl)" if failed else ""))
    return 1 if failed else 0


def launch(a) -> int:
    """`launch`: each run over the hostfile's nodes (with --dry-run: the plan and one command line per run)."""
    mn = MultiNode(os.path.abspath(a.hostfile), a.master_addr, a.master_port, a.launcher)
    sw = open_sweep(a, multinode=mn)
    print(sw.plan_text(), flush=True)
    if a.dry_run:
        done = results.finished_names(sw.dir)
        for run in sw.runs:  # the configs are written so that each printed line can be run as is
            write_config(sw.config_path(run), run_config(run, sw.spec, sw.base, sw.dir))
            env, cmd = multinode_command(run, sw.config_path(run), mn, sw.ranks_per_node)
            print(("# done: " if run.name in done else "") + command_line(env, cmd))
        return 0
    failed = sw.run(jobs=1)
    finish(sw.dir, sw.spec)
    return 1 if failed else 0
