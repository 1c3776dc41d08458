"""The two local lm-eval tasks shipped in tools/eval_tasks/ (no network needed) and how they are built.

  python tools/build_eval_task.py [--out tools/eval_tasks] [--items 300] [--skip-mb 8]

From the Python standard library (the built-in corpus's source), skipping the first --skip-mb MB in the corpus
builder's file order, which is what the main job trains on (it takes the first 4 MB), so that the task is
held-out text of the same kind:
  next_line.jsonl  multiple choice: the 4 lines before a line of code -> which of 4 lines comes next (the true
                   one and 3 lines of the same indentation from other files); choices shuffled by a fixed seed
  heldout.jsonl    plain text documents for rolling-window perplexity
"""
from __future__ import annotations

import json
import os
import random
import sysconfig

from megatron_mhmoe.data.corpus import iter_sources

# The data files live beside the command that rebuilds them (committed, not part of the installed package).
TASKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools",
                         "eval_tasks")
LOCAL = ("mhmoe_next_line", "mhmoe_heldout_ppl")
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


def local_task_yamls(folder: str) -> None:
    """The shipped tasks as lm-eval YAML files in `folder`, pointing at the committed data files."""
    next_line = {
        "task": "mhmoe_next_line", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.join(TASKS_DIR, "next_line.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}
    heldout = {
        "task": "mhmoe_heldout_ppl", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.join(TASKS_DIR, "heldout.jsonl")}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in
                        (("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                         ("bits_per_byte", "bits_per_byte"))],
        "metadata": {"version": 1.0}}
    for task in (next_line, heldout):
        with open(os.path.join(folder, f"{task['task']}.yaml"), "w") as f:
            json.dump(task, f, indent=1)  # JSON is YAML
