"""Tables over seeds: mean +- std of the final validation perplexity and the routing metrics per
(kind, h, mode, variant, extra axes) and E. Dense rows carry E = 0 ('-'). `balancing_table`: one row per
(model, E, variant) with the balance metrics (MaxVio, fan-out), for sweeps with named variants.

The balance and head metrics (MaxVio, per-head activation ratio and effective experts, I(head; expert))
come from the record or else from the run's moe_stats.json (validation set, final weights)."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Optional

from megatron_mhmoe.scaling.results import load_moe_stats

ROUTING_EXTRAS = ("maxvio", "head_activation_ratio", "head_effective_experts", "mi_head_expert_bits")


def series_label(r: dict) -> str:
    """Legend label of a result's series: kind (+ h and matching mode) (+ extra axes)."""
    kind = {"dense": "Dense", "smoe": "SMoE (X-MoE)", "finegrained": "fine-grained SMoE",
            "smoe+shared": "SMoE (X-MoE) + shared"}.get(r["kind"], r["kind"])
    if r["kind"] in ("mhmoe", "mhmoe+shared"):
        kind = f"MH-MoE h={r['h']} [{r['mode']}]" + (" + shared" if r["kind"] == "mhmoe+shared" else "")
    if r.get("variant"):
        kind += f" {r['variant']}"
    vary = r.get("vary") or {}
    if vary:
        kind += " " + ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(vary.items()))
    return kind


def mean_std(xs: Iterable) -> tuple[Optional[float], Optional[float], int]:
    xs = [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    if not xs:
        return None, None, 0
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd, len(xs)


def _dense_key(r: dict) -> tuple:
    vary = {k: v for k, v in (r.get("vary") or {}).items() if not k.startswith("model.moe.")}
    # the variant Dense ran under: the same name when the variant sets keys outside model.moe, else none
    over = r.get("variant_overrides") or {}
    variant = (r.get("variant") or "") if any(not k.startswith("model.moe.") for k in over) else ""
    return r["seed"], tuple(sorted(vary.items())), variant


def add_paired_deltas(records: list[dict]) -> None:
    """r['ppl_vs_dense'] = ppl / ppl of the Dense run with the same seed (and non-MoE axes) - 1.
    Pairing by seed cancels what the seed changes for every kind alike (data order, validation sample)."""
    dense = {_dense_key(r): r.get("val_ppl") for r in records if r.get("kind") == "dense" and r.get("val_ppl")}
    for r in records:
        ref = dense.get(_dense_key(r)) if r.get("kind") != "dense" else None
        r["ppl_vs_dense"] = (r["val_ppl"] / ref - 1.0) if ref and r.get("val_ppl") else None


def with_routing_extras(r: dict) -> dict:
    """r plus ROUTING_EXTRAS read from r['run_dir']/moe_stats.json where r lacks them."""
    missing = [k for k in ROUTING_EXTRAS if r.get(k) is None]
    if not missing or not r.get("run_dir"):
        return r
    stats = load_moe_stats(r["run_dir"]) or {}
    return {**r, **{k: stats.get(k) for k in missing}}


def aggregate(records: list[dict]) -> dict:
    """{series label: {E: {metric: (mean, std, n)}}} over the finished (status ok) records."""
    records = [with_routing_extras(dict(r)) for r in records]
    add_paired_deltas(records)
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("status") == "ok":
            groups[series_label(r)][r.get("experts", 0)].append(r)
    out: dict = {}
    for label, by_e in groups.items():
        out[label] = {}
        for E, rs in sorted(by_e.items()):
            out[label][E] = {m: mean_std(r.get(m) for r in rs)
                             for m in ("val_ppl", "activation_ratio", "effective_experts", "divergence",
                                       "tokens_per_s", "params_total", "params_active", "flops_per_token",
                                       "num_experts", "ppl_vs_dense") + ROUTING_EXTRAS}
    return out


def _pm(t: tuple, fmt: str) -> str:
    m, sd, n = t
    if m is None:
        return "n/a"
    return f"{m:{fmt}} ± {sd:{fmt}}" if n > 1 else f"{m:{fmt}}"


def _pct(t: tuple) -> str:
    m, sd, n = t
    if m is None:
        return "-"
    return f"{100 * m:+.1f}% ± {100 * sd:.1f}" if n > 1 else f"{100 * m:+.1f}%"


def markdown_table(records: list[dict]) -> str:
    """One row per series and E: perplexity, activation ratio, effective experts, divergence, tokens/s,
    MaxVio and the per-head metrics ('n/a' for runs without them)."""
    agg = aggregate(records)
    thr = next((r.get("activation_threshold") for r in records if r.get("activation_threshold") is not None), None)
    head = ("| model | E (ref) | E | params M (active) | val ppl (mean ± std) | vs Dense, same seed | seeds "
            "| activation ratio"
            + (f" (share ≥ {thr}/E)" if thr is not None else "") + " | effective experts | divergence | tokens/s "
            "| MaxVio | head activation ratio | head effective experts | I(head; expert) bits |")
    lines = [head, "|" + "---|" * 15]
    order = sorted(agg, key=lambda s: (not s.startswith("Dense"), not s.startswith("SMoE"), s))
    for label in order:
        for E, m in agg[label].items():
            lines.append(
                f"| {label} | {E or '-'} | {_pm(m['num_experts'], '.0f') if E else '-'} | "
                f"{(m['params_total'][0] or 0) / 1e6:.2f} ({(m['params_active'][0] or 0) / 1e6:.2f}) | "
                f"{_pm(m['val_ppl'], '.2f')} | {_pct(m['ppl_vs_dense'])} | {m['val_ppl'][2]} | "
                f"{_pm(m['activation_ratio'], '.3f') if E else '-'} | {_pm(m['effective_experts'], '.1f') if E else '-'} | "
                f"{_pm(m['divergence'], '.2f') if E else '-'} | {_pm(m['tokens_per_s'], '.0f')} | "
                + " | ".join(_pm(m[k], '.3f') if E else '-' for k in ROUTING_EXTRAS) + " |")
    return "\n".join(lines)


BALANCE_METRICS = (("maxvio", "maxvio_train"), ("fanout_groups_mean", "fanout_groups_mean_train"))
"""(validation-set value in moe_stats.json, fallback: the last logged training step's, results.read_run)."""


def with_balance_metrics(r: dict) -> dict:
    """r plus `maxvio` and `fanout_groups_mean`: the record's, else moe_stats.json's (validation set, final
    weights), else the last logged training step's (moe/maxvio_global, moe/fanout_groups_mean); None if none."""
    r = with_routing_extras(dict(r))
    stats = None
    for key, fallback in BALANCE_METRICS:
        if r.get(key) is None and r.get("run_dir"):
            stats = stats if stats is not None else (load_moe_stats(r["run_dir"]) or {})
            r[key] = stats.get(key)
        if r.get(key) is None:
            r[key] = r.get(fallback)
    return r


def balancing_rows(records: list[dict]) -> list[dict]:
    """One row per (series without the variant, E, variant) of the finished MoE runs, in the order the
    variants first appear: {model, E, variant, overrides, seeds, and (mean, std, n) per metric}."""
    groups: dict = {}
    for r in records:
        if r.get("status") != "ok" or r.get("kind") == "dense":
            continue
        base = series_label({**r, "variant": ""})
        groups.setdefault((base, r.get("experts", 0), r.get("variant") or ""), []).append(with_balance_metrics(r))
    variant_order = {}
    for (_, _, v) in groups:
        variant_order.setdefault(v, len(variant_order))
    rows = []
    for (base, E, v), rs in sorted(groups.items(), key=lambda kv: (not kv[0][0].startswith("SMoE"), kv[0][0],
                                                                  kv[0][1], variant_order[kv[0][2]])):
        row = {"model": base, "E": E, "variant": v or "-", "overrides": rs[0].get("variant_overrides") or {},
               "seeds": sorted(r["seed"] for r in rs)}
        row.update({m: mean_std(r.get(m) for r in rs) for m in ("val_ppl", "activation_ratio", "effective_experts",
                                                                 "maxvio", "fanout_groups_mean")})
        rows.append(row)
    return rows


def balancing_table(records: list[dict]) -> str:
    """Markdown: one row per (model, E, balancing variant): validation perplexity, activation ratio, effective
    experts, MaxVio and fan-out as mean ± std over seeds ('n/a' where no run reports the metric), then one
    line per variant with its overrides."""
    rows = balancing_rows(records)
    if not rows:
        return ""
    lines = ["| model | E | balancing | seeds | val ppl (mean ± std) | activation ratio | effective experts | "
             "MaxVio | fan-out (groups / token) |", "|" + "---|" * 9]
    for row in rows:
        lines.append(f"| {row['model']} | {row['E']} | {row['variant']} | {len(row['seeds'])} | "
                     f"{_pm(row['val_ppl'], '.2f')} | {_pm(row['activation_ratio'], '.3f')} | "
                     f"{_pm(row['effective_experts'], '.1f')} | {_pm(row['maxvio'], '.3f')} | "
                     f"{_pm(row['fanout_groups_mean'], '.2f')} |")
    legend: dict = {}
    for row in rows:
        if row["variant"] != "-":
            legend.setdefault(row["variant"], row["overrides"])
    if legend:
        lines.append("")
        lines += [f"- `{v}`: " + ", ".join(f"`{k.split('.')[-1]}={val}`" for k, val in sorted(over.items()))
                  for v, over in legend.items()]
    return "\n".join(lines)
