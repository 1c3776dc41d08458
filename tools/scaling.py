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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mhmoe.scaling import commands  # noqa: E402


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
            return commands.finish(args.out)
        if args.cmd == "plan":
            print(commands.open_sweep(args).plan_text())
            return 0
        if args.cmd == "run":
            return commands.run_here(args)
        if not args.hostfile:
            ap.error("launch needs --hostfile")
        if not args.master_addr:
            ap.error("launch needs --master-addr (or MASTER_ADDR): node 0's address on the private network")
        return commands.launch(args)
    except ValueError as e:
        print(f"scaling: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
