"""Reading what a finished run left, and the sweep's results.jsonl (one JSON line per finished run).

Per run, train.py writes (rank 0):
  <run_dir>/metrics.jsonl   one line per log interval (loss, tokens_per_s, moe/* of that step) and per
                            validation (val/lm_loss, val/ppl);
  <run_dir>/moe_stats.json  final routing on the validation set: shares [[per expert] per layer],
                            activation_ratio, effective_experts, divergence, divergence_hist {bins, counts}.
moe_stats.json is preferred for the routing metrics; without it the mean over the last (up to 3) logged
training steps is used, and the record says so (`routing_source`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

RESULTS = "results.jsonl"


def read_jsonl(path: str) -> list[dict]:
    """Lines of a JSONL file; a torn last line (killed writer) is skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def finished_names(sweep_dir: str) -> set:
    """Runs recorded as finished in results.jsonl: a rerun of the sweep skips them."""
    return {r["name"] for r in read_jsonl(os.path.join(sweep_dir, RESULTS)) if r.get("status") == "ok"}


def append_result(sweep_dir: str, record: dict) -> None:
    """One line, flushed and fsynced: a crash loses at most the run in flight."""
    with open(os.path.join(sweep_dir, RESULTS), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_moe_stats(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, "moe_stats.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _mean(xs: list) -> Optional[float]:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def read_run(run_dir: str) -> dict:
    """Final validation perplexity, routing metrics and throughput of a finished run."""
    lines = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    vals = [r for r in lines if "val/ppl" in r]
    train = [r for r in lines if "tokens_per_s" in r]
    out: dict = {"val_ppl": vals[-1]["val/ppl"] if vals else None,
                 "val_lm_loss": vals[-1].get("val/lm_loss") if vals else None,
                 "final_step": max((r.get("step", 0) for r in lines), default=0),
                 "train_loss": train[-1].get("lm_loss") if train else None}
    # Throughput: skip the first window (JIT, allocator warm-up) when there are later ones.
    tps = [r["tokens_per_s"] for r in train]
    out["tokens_per_s"] = _mean(tps[1:] if len(tps) > 1 else tps)
    # Balance metrics of the last logged training step that has them (the report's fallback when
    # moe_stats.json lacks the validation-set values).
    for key, name in (("moe/maxvio_global", "maxvio_train"), ("moe/fanout_groups_mean", "fanout_groups_mean_train")):
        logged = [r[key] for r in train if isinstance(r.get(key), (int, float))]
        out[name] = logged[-1] if logged else None
    stats = load_moe_stats(run_dir)
    if stats is not None:
        out.update(activation_ratio=stats.get("activation_ratio"), effective_experts=stats.get("effective_experts"),
                   divergence=stats.get("divergence"), activation_threshold=stats.get("threshold"),
                   routing_source="moe_stats.json (" + str(stats.get("source", "final")) + ")")
    else:
        moe = [r for r in train if "moe/activation_ratio" in r][-3:]
        out.update(activation_ratio=_mean([r["moe/activation_ratio"] for r in moe]),
                   effective_experts=_mean([r.get("moe/effective_experts") for r in moe]),
                   divergence=_mean([r.get("moe/divergence") for r in moe]),
                   activation_threshold=moe[-1].get("moe/activation_threshold") if moe else None,
                   routing_source=f"metrics.jsonl (mean of last {len(moe)} logged steps)" if moe else None)
    return out
