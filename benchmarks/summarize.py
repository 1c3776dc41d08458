"""Markdown tables from the JSON lines of one or more `moe_layer.py` runs (for RESULTS.md / the README).

  python benchmarks/summarize.py run1.txt run2.txt run3.txt

Per point: each run's median times and ratios, then the median ratio over runs and the targets
(ours/floor <= 1.15; ours/DeepSpeed <= 1.0, <= 0.7 for MH-MoE at E=256; memory ours/DeepSpeed <= 1.0).
"""
from __future__ import annotations

import argparse
import json
import statistics


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="files holding moe_layer.py output (JSON lines)")
    args = p.parse_args(argv)
    runs = [load(r) for r in args.runs]
    keys = [(pt["shape"], pt["E"]) for pt in runs[0]]
    print("| shape | E | run | ours ms (spread) | DeepSpeed ms (spread) | floor ms (spread) | ours MB | DS MB "
          "| ours/floor | ours/DS | DS/floor | mem ours/DS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
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
            print(f"| {shape} | {E} | {i + 1} | {cell['ours']} | {cell['deepspeed']} | {cell['floor']} | {mb['ours']} "
                  f"| {mb['deepspeed']} | {r['ours/floor']:.3f} | {r['ours/deepspeed']:.3f} | {r['deepspeed/floor']:.3f} "
                  f"| {r['mem ours/deepspeed']:.3f} |")
            per.append(r)
        summary.append((shape, E, {k: statistics.median(x[k] for x in per)
                                   for k in ("ours/floor", "ours/deepspeed", "deepspeed/floor", "mem ours/deepspeed")},
                        {k: (min(x[k] for x in per), max(x[k] for x in per))
                         for k in ("ours/floor", "ours/deepspeed", "mem ours/deepspeed")}))
    print(f"\nMedian over {len(runs)} run(s) [min-max over runs]; ✓ = target met by the median.\n")
    print("| shape | E | ours/floor (≤1.15) | ours/DS (≤1.0; MH-MoE E=256 ≤0.7) | DS/floor | mem ours/DS (≤1.0) |")
    print("|---|---|---|---|---|---|")
    for shape, E, med, rng in summary:
        def c(key):
            mark = "✓" if target_ok(shape, E, key, med[key]) else "✗"
            return f"{med[key]:.3f} [{rng[key][0]:.2f}-{rng[key][1]:.2f}] {mark}"
        print(f"| {shape} | {E} | {c('ours/floor')} | {c('ours/deepspeed')} | {med['deepspeed/floor']:.3f} "
              f"| {c('mem ours/deepspeed')} |")


if __name__ == "__main__":
    main()
