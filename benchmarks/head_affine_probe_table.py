"""The head-affine probe's table (presets/head_affine_probe.yaml) with the per-head metrics, from a sweep folder.

  python benchmarks/head_affine_probe_table.py runs/sweeps/head_affine

One row per variant (shared, head-G2, head-G4, group-M1), mean ± std over the seeds every variant finished: validation
perplexity, its difference from the shared pool's run of the same seed, activation ratio and effective experts (over the 64), MaxVio, and per head (moe_stats.json,
validation set, final weights): effective experts of one head, the share of a head's reachable experts
(E/G with head_groups G, else E) that it activates, and the mutual information between head and expert
(bits; with G head groups at least log2 G by construction, the group being a function of the head).
"""
from __future__ import annotations

import glob
import math
import os
import re
import statistics
import sys

import common  # noqa: F401  (puts the repo on sys.path)

from megatron_mhmoe.scaling.results import load_moe_stats, read_run

VARIANT = re.compile(r"-E(\d+)-(.+)-s(\d+)$")
GROUPS = {"head-G2": 2, "head-G4": 4}


def rows(sweep_dir: str) -> dict:
    out: dict = {}
    for run_dir in sorted(glob.glob(os.path.join(sweep_dir, "runs", "*"))):
        m = VARIANT.search(os.path.basename(run_dir))
        stats = load_moe_stats(run_dir)
        if not m or stats is None:
            continue
        E, variant = int(m.group(1)), m.group(2)
        run = read_run(run_dir)
        heads = len(stats["head_shares"][0]) if stats.get("head_shares") else 1
        reach = E // GROUPS.get(variant, 1)
        out.setdefault(variant, []).append(dict(
            seed=int(m.group(3)), val_ppl=run["val_ppl"], activation_ratio=stats["activation_ratio"],
            effective_experts=stats["effective_experts"], maxvio=stats.get("maxvio"),
            head_effective_experts=stats["head_effective_experts"],
            head_reach_activation=stats["head_activation_ratio"] * E / reach,
            mi_head_expert_bits=stats["mi_head_expert_bits"], heads=heads, reach=reach))
    # Only the seeds every variant finished, so that the rows compare the same seeds.
    common = set.intersection(*({r["seed"] for r in rs} for rs in out.values())) if out else set()
    return {v: [r for r in rs if r["seed"] in common] for v, rs in out.items()}


def _pm(vals: list, fmt: str) -> str:
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return "n/a"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{format(statistics.mean(vals), fmt)} ± {format(sd, fmt.replace('+', ''))}"


def table(sweep_dir: str) -> str:
    lines = ["| variant | seeds | val ppl | ppl - shared (same seed) | activation ratio | effective experts | MaxVio | experts a head reaches | "
             "head effective experts | head activation (of reach) | MI head-expert bits |", "|" + "---|" * 11]
    found = rows(sweep_dir)
    order = ["shared", "head-G2", "head-G4", "group-M1"]
    for variant in sorted(found, key=lambda v: (order.index(v) if v in order else len(order), v)):
        rs = found[variant]
        shared = {r["seed"]: r["val_ppl"] for r in found.get("shared", [])}
        deltas = [r["val_ppl"] - shared[r["seed"]] for r in rs if r["seed"] in shared and r["val_ppl"] is not None]
        lines.append(f"| {variant} | {len(rs)} | {_pm([r['val_ppl'] for r in rs], '.2f')} | {_pm(deltas, '+.2f')} | "
                     f"{_pm([r['activation_ratio'] for r in rs], '.3f')} | "
                     f"{_pm([r['effective_experts'] for r in rs], '.1f')} | {_pm([r['maxvio'] for r in rs], '.3f')} | "
                     f"{rs[0]['reach']} | {_pm([r['head_effective_experts'] for r in rs], '.1f')} | "
                     f"{_pm([r['head_reach_activation'] for r in rs], '.3f')} | "
                     f"{_pm([r['mi_head_expert_bits'] for r in rs], '.2f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "runs/sweeps/head_affine"))
