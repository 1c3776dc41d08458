#!/usr/bin/env python
"""Merge several Megatron `.bin/.idx` datasets (same tokenizer) into one, in the order given.

Example:
  python tools/merge_datasets.py --input data/a_text_document data/b_text_document \\
      --output-prefix data/ab_text_document
A directory given to --input contributes all its datasets (every *.idx), sorted by name.
Token files are stream-copied; only the index arrays are held in memory.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_mhmoe.data.errors import DataError  # noqa: E402
from megatron_mhmoe.data.indexed import expand_prefixes, merge_datasets, normalize_prefix  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes or directories of datasets")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx/.meta.json")
    args = p.parse_args(argv)
    try:
        prefixes = expand_prefixes(args.input)
        out = normalize_prefix(args.output_prefix)
        if out in prefixes:
            raise DataError(f"--output-prefix {out} is also an input; choose a new name")
        meta = merge_datasets(prefixes, out, log=lambda m: print(m, file=sys.stderr, flush=True))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{out}: {meta['num_documents']} documents, {meta['num_tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
