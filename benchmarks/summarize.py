"""Markdown tables from the JSON lines of one or more `moe_layer.py` runs, and the generated tables of
benchmarks/RESULTS.md.

  python benchmarks/summarize.py run1.txt run2.txt run3.txt     # tables of these runs
  python benchmarks/summarize.py --results benchmarks/RESULTS.md            # rewrite its generated tables
  python benchmarks/summarize.py --results benchmarks/RESULTS.md --check    # exit 1 if they are stale

Per point: each run's median times and ratios, then the median ratio over runs and the targets
(ours/floor <= 1.15; ours/DeepSpeed <= 1.0, <= 0.7 for MH-MoE at E=256; memory ours/DeepSpeed <= 1.0).
RESULTS.md's generated blocks (between `<!-- BEGIN generated: NAME -->` and `<!-- END generated: NAME -->`)
are the summaries of the committed final runs named in FINAL_RUNS; everything else in it is hand-written.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FINAL_RUNS = {  # generated block -> the committed runs it summarises (globs under benchmarks/results/)
    "moe_layer": "2026-12-08-moe_layer-final-run*.jsonl",
    "moe_two_node": "2026-12-08-moe_two_node-rails-run*.txt",
}


def load(path: str) -> list[dict]:
    """The moe_layer points of one run: its printed output (`JSON {...}` lines among comments and log
    lines) or the bare JSON lines kept under benchmarks/results/; points of other benchmarks are skipped."""
    points = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("JSON "):
                line = line[5:]
            if not line.startswith("{"):
                continue
            point = json.loads(line)
            if point.get("bench", "moe_layer") == "moe_layer":
                points.append(point)
    if not points:
        raise SystemExit(f"{path}: no moe_layer result lines (JSON objects, optionally after 'JSON ')")
    return points


def target_ok(shape: str, E: int, key: str, value: float) -> bool:
    if key == "ours/floor":
        return value <= 1.15
    if key == "ours/deepspeed":
        return value <= (0.7 if shape == "mhmoe" and E == 256 else 1.0)
    return value <= 1.0  # memory


def run_tables(runs: list[list[dict]]) -> tuple[str, str]:
    """(per-run table, summary table with its heading line) of moe_layer runs."""
    keys = [(pt["shape"], pt["E"]) for pt in runs[0]]
    per_run = ["| shape | E | run | ours ms (spread) | DeepSpeed ms (spread) | floor ms (spread) | ours MB | DS MB "
               "| ours/floor | ours/DS | DS/floor | mem ours/DS |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for shape, E in keys:
        per = []
        for i, run in enumerate(runs):
            pt = next((q for q in run if (q["shape"], q["E"]) == (shape, E)), None)
            if pt is None:
                continue
            im, r = pt["impl"], pt["ratios"]
            cell = {n: f"{im[n]['median_ms']:.0f} (±{im[n]['spread_pct']:.0f}%)" if n in im else "-"
                    for n in ("ours", "deepspeed", "floor")}
            mb = {n: f"{im[n]['peak_mb']:.0f}" if "peak_mb" in im.get(n, {}) else "-" for n in ("ours", "deepspeed")}
            per_run.append(f"| {shape} | {E} | {i + 1} | {cell['ours']} | {cell['deepspeed']} | {cell['floor']} "
                           f"| {mb['ours']} | {mb['deepspeed']} | {r['ours/floor']:.3f} | {r['ours/deepspeed']:.3f} "
                           f"| {r['deepspeed/floor']:.3f} | {r['mem ours/deepspeed']:.3f} |")
            per.append(r)
        summary.append((shape, E, {k: statistics.median(x[k] for x in per)
                                   for k in ("ours/floor", "ours/deepspeed", "deepspeed/floor", "mem ours/deepspeed")},
                        {k: (min(x[k] for x in per), max(x[k] for x in per))
                         for k in ("ours/floor", "ours/deepspeed", "mem ours/deepspeed")}))
    out = [f"Median over {len(runs)} run(s) [min-max over runs]; ✓ = target met by the median.", "",
           "| shape | E | ours/floor (≤1.15) | ours/DS (≤1.0; MH-MoE E=256 ≤0.7) | DS/floor | mem ours/DS (≤1.0) |",
           "|---|---|---|---|---|---|"]
    for shape, E, med, rng in summary:
        def c(key):
            mark = "✓" if target_ok(shape, E, key, med[key]) else "✗"
            return f"{med[key]:.3f} [{rng[key][0]:.2f}-{rng[key][1]:.2f}] {mark}"
        out.append(f"| {shape} | {E} | {c('ours/floor')} | {c('ours/deepspeed')} | {med['deepspeed/floor']:.3f} "
                   f"| {c('mem ours/deepspeed')} |")
    return "\n".join(per_run), "\n".join(out)


def final_runs(name: str) -> list[str]:
    paths = sorted(glob.glob(os.path.join(HERE, "results", FINAL_RUNS[name])))
    if not paths:
        raise SystemExit(f"no committed runs match benchmarks/results/{FINAL_RUNS[name]}")
    return paths


def generated_blocks() -> dict[str, str]:
    """The text of each generated block of RESULTS.md, from the committed final runs."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import moe_two_node  # the two-node benchmark owns its own summary
    return {"moe_layer": run_tables([load(p) for p in final_runs("moe_layer")])[1],
            "moe_two_node": moe_two_node.summarize(final_runs("moe_two_node")).strip()}


def update_results(path: str, check: bool) -> int:
    """Rewrite (or, with check, compare) each generated block of the results file; 1 if a block is stale or
    missing, else 0."""
    text = open(path, encoding="utf-8").read()
    new = text
    for name, block in generated_blocks().items():
        pattern = re.compile(rf"(<!-- BEGIN generated: {name} -->\n)(?:.*?\n)?(<!-- END generated: {name} -->)", re.S)
        if not pattern.search(new):
            print(f"{path}: no generated block {name!r} (<!-- BEGIN generated: {name} --> ... "
                  f"<!-- END generated: {name} -->)", file=sys.stderr)
            return 1
        new = pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), new)
    if new == text:
        return 0
    if check:
        print(f"{path}: generated tables are stale: run python benchmarks/summarize.py --results {path}",
              file=sys.stderr)
        return 1
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    print(f"{path}: generated tables rewritten")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="files holding moe_layer.py output (JSON lines)")
    p.add_argument("--results", metavar="RESULTS_MD", help="rewrite the generated tables of this file")
    p.add_argument("--check", action="store_true", help="with --results: exit 1 if they are stale, write nothing")
    args = p.parse_args(argv)
    if args.results:
        return update_results(args.results, args.check)
    if not args.runs:
        p.error("give moe_layer.py output files, or --results RESULTS_MD")
    per_run, summary = run_tables([load(r) for r in args.runs])
    print(per_run)
    print()
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
