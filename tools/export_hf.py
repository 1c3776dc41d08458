#!/usr/bin/env python
"""Export a trained model as a Hugging Face transformers folder (megatron_mhmoe/export/huggingface.py; --help)."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_mhmoe.checkpoint.consolidate import run_checkpoint_tool  # noqa: E402
from megatron_mhmoe.export import huggingface  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=huggingface.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="checkpoint (step folder or save_dir) or export_checkpoint folder")
    p.add_argument("--output", required=True, help="folder to write (must not exist, unless --force)")
    p.add_argument("--format", choices=["mhmoe", "gpt2"], default="mhmoe")
    p.add_argument("--tokenizer", default=None,
                   help="'byte', a SentencePiece .model or a tokenizer.json (default: the run's)")
    p.add_argument("--force", action="store_true", help="replace an existing --output folder")
    p.add_argument("--quiet", action="store_true", help="only errors")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    return run_checkpoint_tool(lambda: huggingface.export_hf(args.input, args.output, args.format, args.tokenizer,
                                                             args.force, log), args.input)


if __name__ == "__main__":
    sys.exit(main())
