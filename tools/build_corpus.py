#!/usr/bin/env python
"""Write a JSONL corpus of this machine's Python standard library sources (no download needed).

Each line is {"text": <source of one .py file>, "path": <path relative to the stdlib root>}, in a
deterministic (sorted) order, stopping before the output exceeds --max-mb. site-packages and
__pycache__ are skipped; files are decoded per their PEP 263 coding line (undecodable ones skipped).
--repeat N writes the same corpus N times (to build large benchmark inputs).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megatron_mhmoe.data.corpus import build_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output JSONL path")
    p.add_argument("--max-mb", type=float, default=8.0, help="size limit of one copy in MB (default 8)")
    p.add_argument("--stdlib", default=None, help="source root (default: sysconfig stdlib of this Python)")
    p.add_argument("--repeat", type=int, default=1, help="write the corpus this many times")
    args = p.parse_args(argv)
    t = time.perf_counter()
    docs, nbytes = build_corpus(args.out, args.max_mb, args.stdlib, args.repeat)
    print(f"wrote {docs} documents, {nbytes / 1e6:.1f} MB to {args.out} in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
