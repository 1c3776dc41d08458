#!/usr/bin/env python
"""Build the local evaluation tasks shipped in tools/eval_tasks/ (run once; the output is committed).
What they hold: megatron_mhmoe/evaluation/tasks.py (--help)."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_mhmoe.evaluation import tasks  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=tasks.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=tasks.TASKS_DIR)
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--heldout-docs", type=int, default=4)
    p.add_argument("--skip-mb", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    n, h = tasks.build(a.out, a.items, a.skip_mb, a.heldout_docs, a.seed)
    print(f"wrote {n} multiple-choice items and {h} held-out documents to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
