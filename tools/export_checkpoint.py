#!/usr/bin/env python
"""Export a training checkpoint as one single-process model (megatron_mhmoe/export/native.py; --help)."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_mhmoe.checkpoint.consolidate import run_checkpoint_tool  # noqa: E402
from megatron_mhmoe.export import native  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=native.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a checkpoint step folder, or a save_dir (its `latest` is used)")
    p.add_argument("--output", required=True, help="folder to write (must not exist, unless --force)")
    p.add_argument("--dtype", choices=["as-trained", "fp32", "bf16", "fp16"], default="as-trained",
                   help="dtype of the exported weights (default: as stored by the run)")
    p.add_argument("--tokenizer", default=None,
                   help="'byte' or a SentencePiece .model to ship with the export (default: the run's, found "
                        "from its config or its data's .meta.json)")
    p.add_argument("--force", action="store_true", help="replace an existing --output folder")
    p.add_argument("--quiet", action="store_true", help="only errors")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    return run_checkpoint_tool(lambda: native.export(args.input, args.output, args.dtype, args.tokenizer, args.force,
                                                     log), args.input)


if __name__ == "__main__":
    sys.exit(main())
