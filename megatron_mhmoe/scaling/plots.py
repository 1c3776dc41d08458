"""The paper's figures from results.jsonl (matplotlib Agg, PNG), and a wandb summary run holding them.

  ppl_vs_experts.png       validation perplexity vs E per model kind, mean +- std over seeds (Fig. 6 shape);
                           Dense as a horizontal line; published numbers (spec.reference_ppl) dashed
  activation_vs_experts.png activation ratio and effective experts / E vs E
  expert_shares.png        layer x expert heatmap of each expert's share of its layer's assignments, in units
                           of the uniform share 1/E, SMoE beside MH-MoE at the largest common E (Fig. 1/5)
  divergence_hist.png      tokens by the number of distinct experts their sub-tokens went to (Fig. 7)
  tokens_per_s_vs_experts.png throughput vs E
  balance_vs_experts.png   MaxVio, per-head effective experts / E and I(head; expert) in bits vs E (only when
                           some run's moe_stats.json has them)
Shares and divergence histograms come from each run's moe_stats.json; without it those two figures are
skipped with a note (the others only need results.jsonl).
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Callable, Optional

from megatron_mhmoe.scaling import report, results


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(records: list[dict], metric: str) -> dict:
    agg = report.aggregate(records)
    return {label: {E: v[metric] for E, v in by_e.items()} for label, by_e in agg.items()}


def _xaxis(ax, experts: list) -> None:
    ax.set_xscale("log", base=2)
    if experts:
        ax.set_xticks(experts)
        ax.set_xticklabels([str(e) for e in experts])
    ax.set_xlabel("experts E per MoE layer (the SMoE reference's E)")
    ax.grid(alpha=0.3)


def plot_metric_vs_experts(records: list[dict], metric: str, ylabel: str, path: str, title: str,
                           reference: Optional[dict] = None, logy: bool = False) -> Optional[str]:
    series = _series(records, metric)
    experts = sorted({E for s in series.values() for E in s if E})
    if not experts and not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in sorted(series):
        pts = series[label]
        if label.startswith("Dense"):
            m, sd, n = pts.get(0, (None, None, 0))
            if m is not None and experts:
                ax.axhline(m, color="k", ls="-", lw=1, label=f"{label} (n={n})")
                if sd:
                    ax.axhspan(m - sd, m + sd, color="k", alpha=0.08)
            continue
        xs = [E for E in sorted(pts) if pts[E][0] is not None]
        if not xs:
            continue
        ax.errorbar(xs, [pts[E][0] for E in xs], yerr=[pts[E][1] for E in xs], marker="o", capsize=3,
                    label=f"{label} (n={max(pts[E][2] for E in xs)})")
    for name, pts in (reference or {}).items():
        pts = {int(k): float(v) for k, v in pts.items()}
        if 0 in pts:
            ax.axhline(pts[0], color="gray", ls=":", lw=1, label=f"paper: {name}")
        xs = sorted(E for E in pts if E)
        if xs:
            ax.plot(xs, [pts[E] for E in xs], ls="--", marker="x", alpha=0.6, label=f"paper: {name}")
    _xaxis(ax, experts)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_activation(records: list[dict], path: str) -> Optional[str]:
    act, eff = _series(records, "activation_ratio"), _series(records, "effective_experts")
    labels = [l for l in sorted(act) if not l.startswith("Dense")]
    if not labels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    experts = sorted({E for l in labels for E in act[l] if E})
    thr = next((r.get("activation_threshold") for r in records if r.get("activation_threshold") is not None), None)
    for label in labels:
        xs = [E for E in sorted(act[label]) if act[label][E][0] is not None]
        axes[0].errorbar(xs, [act[label][E][0] for E in xs], yerr=[act[label][E][1] for E in xs], marker="o",
                         capsize=3, label=label)
        xs2 = [E for E in sorted(eff[label]) if eff[label][E][0] is not None]
        # effective experts relative to the run's actual expert count (E' differs from E in 'flops' mode)
        n_exp = _series(records, "num_experts")[label]
        axes[1].errorbar(xs2, [eff[label][E][0] / max(n_exp[E][0] or 1, 1) for E in xs2],
                         yerr=[(eff[label][E][1] or 0) / max(n_exp[E][0] or 1, 1) for E in xs2], marker="o",
                         capsize=3, label=label)
    for ax in axes:
        _xaxis(ax, experts)
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel(f"activation ratio (cells with share >= {thr} x 1/E)" if thr is not None
                       else "activation ratio")
    axes[1].set_ylabel("effective experts / E  (exp entropy of shares)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pick_runs(records: list[dict]) -> tuple[Optional[dict], list[dict]]:
    """(SMoE run, [MH-MoE runs]) at the largest E where both have moe_stats.json; lowest seed."""
    by_e: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("status") == "ok" and r["kind"] in ("smoe", "mhmoe") and results.load_moe_stats(r["run_dir"]):
            by_e[r["experts"]][r["kind"]].append(r)
    for E in sorted(by_e, reverse=True):
        if by_e[E]["smoe"] and by_e[E]["mhmoe"]:
            smoe = min(by_e[E]["smoe"], key=lambda r: (r.get("variant") or "", sorted((r.get("vary") or {}).items())
                                                       .__str__(), r["seed"]))
            mh: dict = {}
            for r in sorted(by_e[E]["mhmoe"], key=lambda r: r["seed"]):
                key = (r["h"], r["mode"], r.get("variant") or "", str(sorted((r.get("vary") or {}).items())))
                mh.setdefault(key, r)
            return smoe, list(mh.values())[:3]
    return None, []


def plot_shares(records: list[dict], path: str) -> Optional[str]:
    smoe, mh = _pick_runs(records)
    if smoe is None:
        return None
    import numpy as np
    plt = _plt()
    runs = [smoe] + mh
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.2), squeeze=False)
    im = None
    for ax, r in zip(axes[0], runs):
        st = results.load_moe_stats(r["run_dir"])
        shares = np.asarray(st["shares"], dtype=float)  # (L_moe, E)
        rel = shares * shares.shape[1]  # 1.0 = uniform share 1/E
        im = ax.imshow(rel, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, float(np.percentile(rel, 99))),
                       interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(rel.shape[0]))
        ax.set_title(f"{report.series_label(r)} E={shares.shape[1]} seed {r['seed']}\nactivation "
                     f"{st.get('activation_ratio', float('nan')):.1%}, effective experts "
                     f"{st.get('effective_experts', float('nan')):.1f}", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="share x E (1 = uniform)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_divergence(records: list[dict], path: str) -> Optional[str]:
    smoe, mh = _pick_runs(records)
    runs = ([smoe] if smoe else []) + mh
    if not runs:
        return None
    import numpy as np
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        hist = (results.load_moe_stats(r["run_dir"]) or {}).get("divergence_hist") or {}
        bins, counts = hist.get("bins"), hist.get("counts")
        if not counts:
            continue
        counts = np.asarray(counts, dtype=float)
        bins = np.asarray(bins if bins is not None and len(bins) == len(counts) else range(len(counts)))
        keep = bins > 0  # bin 0 (no expert) is empty by construction
        ax.bar(bins[keep] + (i - (len(runs) - 1) / 2) * width, counts[keep] / max(counts.sum(), 1), width,
               label=f"{report.series_label(r)} E={r.get('num_experts')}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("distinct experts a token's sub-tokens went to (divergence level)")
    ax.set_ylabel("fraction of tokens")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_balance(records: list[dict], path: str) -> Optional[str]:
    """MaxVio, per-head effective experts / E and I(head; expert) vs E; None when no run reports them."""
    series = {k: _series(records, k) for k in ("maxvio", "head_effective_experts", "mi_head_expert_bits")}
    n_exp = _series(records, "num_experts")
    labels = [l for l in sorted(series["maxvio"]) if not l.startswith("Dense")
              and any(v[0] is not None for k in series for v in series[k][l].values())]
    if not labels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    experts = sorted({E for l in labels for E in series["maxvio"][l] if E})
    for ax, (key, ylabel) in zip(axes, (("maxvio", "MaxVio (max load / mean load - 1)"),
                                        ("head_effective_experts", "per-head effective experts / E"),
                                        ("mi_head_expert_bits", "I(head; expert) [bits]"))):
        for label in labels:
            pts = series[key][label]
            xs = [E for E in sorted(pts) if pts[E][0] is not None]
            scale = [max(n_exp[label][E][0] or 1, 1) if key == "head_effective_experts" else 1 for E in xs]
            ax.errorbar(xs, [pts[E][0] / s for E, s in zip(xs, scale)],
                        yerr=[(pts[E][1] or 0) / s for E, s in zip(xs, scale)], marker="o", capsize=3, label=label)
        _xaxis(ax, experts)
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_all(sweep_dir: str, records: list[dict], reference: Optional[dict] = None,
             log: Callable[[str], None] = print) -> list[str]:
    """Every figure that the records allow; returns the written paths."""
    out = os.path.join(sweep_dir, "plots")
    os.makedirs(out, exist_ok=True)
    made = [
        plot_metric_vs_experts(records, "val_ppl", "validation perplexity", os.path.join(out, "ppl_vs_experts.png"),
                               "validation perplexity vs experts (mean ± std over seeds)", reference),
        plot_activation(records, os.path.join(out, "activation_vs_experts.png")),
        plot_metric_vs_experts(records, "tokens_per_s", "training tokens/s",
                               os.path.join(out, "tokens_per_s_vs_experts.png"), "throughput vs experts"),
    ]
    shares = plot_shares(records, os.path.join(out, "expert_shares.png"))
    div = plot_divergence(records, os.path.join(out, "divergence_hist.png"))
    if shares is None or div is None:
        log("plots: no SMoE + MH-MoE pair with moe_stats.json at a common E: expert-share heatmap and divergence "
            "histogram skipped")
    made += [shares, div, plot_balance(records, os.path.join(out, "balance_vs_experts.png"))]
    return [p for p in made if p]


def log_summary_run(spec, sweep_dir: str, records: list[dict], images: list[str], table_md: str) -> Optional[str]:
    """One wandb run `<sweep>-summary` (job_type summary) in the sweep's group: the figures as images and
    the results as a table. Returns its local folder, or None when wandb is disabled/unavailable."""
    from megatron_mhmoe.runtime.logging import redact, resolve_wandb_mode
    mode = resolve_wandb_mode(spec.wandb_mode)
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    wdir = os.path.join(sweep_dir, "summary_wandb")
    os.makedirs(wdir, exist_ok=True)
    run = wandb.init(project=spec.wandb_project, group=spec.name, name=f"{spec.name}-summary", job_type="summary",
                     tags=[spec.name, "summary"], dir=wdir, mode=mode, reinit=True,
                     config=redact({"sweep": {k: v for k, v in vars(spec).items()}}))
    try:
        run.log({os.path.splitext(os.path.basename(p))[0]: wandb.Image(p) for p in images})
        cols = ["name", "kind", "experts", "num_experts", "h", "mode", "variant", "seed", "params_total", "params_active",
                "flops_per_token", "tokens", "val_ppl", "activation_ratio", "effective_experts", "divergence",
                "tokens_per_s", "nodes", "ep", *report.ROUTING_EXTRAS]
        ok = [report.with_routing_extras(r) for r in records if r.get("status") == "ok"]
        run.log({"results": wandb.Table(columns=cols, data=[[r.get(c) if not isinstance(r.get(c), dict) else
                                                              str(r.get(c)) for c in cols] for r in ok])})
        run.summary["results_markdown"] = table_md
        return getattr(run, "dir", None)
    finally:
        run.finish()
