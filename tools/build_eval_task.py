#!/usr/bin/env python
"""Build the local evaluation task shipped in tools/eval_tasks/ (run once; the output is committed).

  python tools/build_eval_task.py [--out tools/eval_tasks] [--items 300] [--skip-mb 8]

From the Python standard library (the built-in corpus's source), skipping the first --skip-mb MB in the corpus
builder's file order, which is what the main job trains on (it takes the first 4 MB), so that the task is
held-out text of the same kind:
  next_line.jsonl  multiple choice: the 4 lines before a line of code -> which of 4 lines comes next (the true
                   one and 3 lines of the same indentation from other files); choices shuffled by a fixed seed
  heldout.jsonl    plain text documents for rolling-window perplexity
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import sysconfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_mhmoe.data.corpus import iter_sources  # noqa: E402

CONTEXT_LINES = 4
CHOICES = 4


def _candidate_lines(text: str) -> list[tuple[list[str], str]]:
    lines = text.splitlines()
    out = []
    for i in range(CONTEXT_LINES, len(lines)):
        line = lines[i]
        context = lines[i - CONTEXT_LINES:i]
        # A line that says something (not blank, a lone bracket or a comment) after a context of code.
        if len(line.strip()) >= 12 and not line.strip().startswith("#") and all(c.strip() for c in context):
            out.append((context, line))
    return out


def build(out: str, items: int, skip_mb: float, heldout_docs: int, seed: int) -> tuple[int, int]:
    root = sysconfig.get_paths()["stdlib"]
    skipped, files = 0, []
    for rel, text in iter_sources(root):
        size = len(json.dumps({"text": text, "path": rel}, ensure_ascii=False).encode("utf-8")) + 1
        if skipped < skip_mb * 1e6:
            skipped += size
            continue
        if 2_000 <= len(text) <= 60_000:
            files.append((rel, text))
    rng = random.Random(seed)
    rng.shuffle(files)
    small = [f for f in files if len(f[1]) <= 15_000]  # a perplexity pass that takes seconds, not minutes
    heldout = small[:heldout_docs]
    pool = [f for f in files if f not in heldout]
    by_indent: dict[int, list[str]] = {}
    per_file = []
    for rel, text in pool:
        cands = _candidate_lines(text)
        if cands:
            per_file.append((rel, cands))
            for _, line in cands:
                by_indent.setdefault(len(line) - len(line.lstrip()), []).append(line)
    records = []
    for rel, cands in per_file:
        if len(records) >= items:
            break
        context, line = cands[rng.randrange(len(cands))]
        indent = len(line) - len(line.lstrip())
        others = [c for c in by_indent.get(indent, []) if c != line]
        if len(others) < CHOICES - 1:
            continue
        choices = rng.sample(others, CHOICES - 1) + [line]
        rng.shuffle(choices)
        records.append({"context": "\n".join(context) + "\n", "choices": choices, "label": choices.index(line),
                        "path": rel})
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "next_line.jsonl"), "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(os.path.join(out, "heldout.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n" for rel, text in heldout)
    return len(records), len(heldout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_tasks"))
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--heldout-docs", type=int, default=4)
    p.add_argument("--skip-mb", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    n, h = build(a.out, a.items, a.skip_mb, a.heldout_docs, a.seed)
    print(f"wrote {n} multiple-choice items and {h} held-out documents to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
