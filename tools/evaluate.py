#!/usr/bin/env python
"""Evaluate a trained model with lm-eval-harness, offline (megatron_mhmoe/evaluation/harness.py; --help)."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_mhmoe.evaluation import harness  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=harness.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint, export_checkpoint folder or export_hf folder")
    p.add_argument("--tasks", default="local", help="comma-separated lm-eval task names; 'local' = the shipped ones")
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task (smoke runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-wandb", action="store_true", help="write the JSON only")
    p.add_argument("--wandb-group", default="eval")
    p.add_argument("--wandb-name", default=None, help="default: the model folder's name")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("error: tools/evaluate.py needs the lm-eval package: pip install lm-eval", file=sys.stderr)
        return 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    harness.evaluate_to_file(args.model, tasks, args.out, args.batch_size, args.limit, args.device,
                             None if args.no_wandb else args.wandb_group, args.wandb_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
