#!/usr/bin/env python
"""Convert a training checkpoint to another parallel layout (megatron_mhmoe/checkpoint/reshard.py; --help)."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_mhmoe.checkpoint import reshard  # noqa: E402
from megatron_mhmoe.checkpoint.consolidate import run_checkpoint_tool  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=reshard.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a checkpoint step folder, or a save_dir (its `latest` is used)")
    p.add_argument("--output", required=True, help="new save_dir for the converted checkpoint (must hold no "
                                                   "checkpoint yet, unless --force)")
    p.add_argument("--world-size", type=int, required=True, help="target number of ranks")
    p.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    p.add_argument("--ep", type=int, required=True, help="target expert-parallel size")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                   help="target ZeRO stage (default: the source's; 3 only for dense models)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="target training precision (default: the source's)")
    p.add_argument("--force", action="store_true", help="write into an output save_dir that already has checkpoints")
    p.add_argument("--quiet", action="store_true", help="only errors")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    return run_checkpoint_tool(lambda: reshard.reshard(args.input, args.output, args.world_size, args.tp, args.ep,
                                                       args.zero_stage, args.precision, args.force, log), args.input)


if __name__ == "__main__":
    sys.exit(main())
