"""Routing statistics: what the layer returns each step, and the paper's metrics computed from it.

Expert activation is measured on *shares*: the fraction of a layer's routed assignments that each
expert received, compared with the uniform share 1/E. The paper's own "selections / tokens above a
threshold" grows with h*k by construction, so it cannot compare h=1 with h>1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_mhmoe.moe.fixed_counts import fixed_bincount


@dataclass
class MoEStats:
    """Returned by one MoE layer's forward (replica-wide: summed over the TP ranks of a replica)."""

    aux_loss: torch.Tensor
    """Load-balance loss E * sum f_e P_e (0-dim, differentiable; f from balance_counts, moe/losses.py)."""
    z_loss: torch.Tensor
    """Router z-loss mean(logsumexp(logits)^2) (0-dim, differentiable)."""
    selections: torch.Tensor
    """(E,) assignments (sub-token choices) routed to each expert, before capacity."""
    kept: Optional[torch.Tensor]
    """(E,) assignments each expert processed, after capacity. This and the other routing statistics
    (divergence, head_counts, fanout_*) are None until summed when the layer's stats_mode is 'deferred'
    (moe/routing_stats.reduce_pending) and stay None when it is 'off'."""
    divergence: Optional[torch.Tensor]
    """(h*k+1,) tokens by the number of distinct experts their h*k assignments went to."""
    num_tokens: int
    num_sub_tokens: int
    seq_aux_loss: Optional[torch.Tensor] = None
    """Sequence-wise balance loss (MoEConfig.seq_aux_loss_coef; 0 with a zero gradient when that is 0)."""
    global_aux_loss: Optional[torch.Tensor] = None
    """Global-batch balance loss E * sum f^global P (MoEConfig.global_aux_loss_coef; 0 when that is 0)."""
    prob_sum: Optional[torch.Tensor] = None
    """(E,) the replica's summed router probabilities (differentiable): P_e = prob_sum / num_sub_tokens."""
    balance_counts: Optional[torch.Tensor] = None
    """(E,) the replica's balance counts (MoEConfig.balance_counting): f_e = balance_counts_e /
    (balance_choices x num_sub_tokens)."""
    balance_choices: int = 1
    """Choices counted per sub-token in balance_counts (k for 'topk', 1 for 'first_choice')."""
    global_balance_counts: Optional[torch.Tensor] = None
    """(E,) balance_counts summed over the DP group for this micro-batch (only with the global-batch loss on)."""
    global_sub_tokens: int = 0
    """num_sub_tokens summed over the DP group (with global_balance_counts)."""
    head_counts: Optional[torch.Tensor] = None
    """(h, E) assignments (all k choices, before capacity) of sub-token j of every token ("head j") to e."""
    fanout_groups: Optional[torch.Tensor] = None
    """(h*k+1,) tokens by the number of distinct expert groups (MoEConfig.route_groups) their h*k choices
    reach, before capacity: with groups = nodes, the nodes a token's traffic goes to."""
    fanout_ranks: Optional[torch.Tensor] = None
    """(h*k+1,) tokens by the number of distinct EP ranks their h*k choices reach (depends on the layout)."""
    quantile_hist: Optional[torch.Tensor] = None
    """(E x bins,) quantile balancing's required-bias histograms over the replica (moe/quantile_balancing.py);
    None when MoEConfig.quantile_balancing is off."""
    local_routing: Optional[dict] = None
    """stats_mode 'deferred': this rank's share of the routing statistics ({field: tensor}), on the device,
    until moe/routing_stats.reduce_pending sums them over TP into the fields above; None otherwise."""

    @property
    def dropped(self) -> int:
        return int(self.selections.sum() - self.kept.sum())

    @property
    def dropped_fraction(self) -> float:
        total = int(self.selections.sum())
        return self.dropped / total if total else 0.0


def expert_shares(selections: torch.Tensor) -> torch.Tensor:
    """(L, E) assignment counts -> (L, E) shares of each layer's assignments (rows sum to 1)."""
    sel = selections.double()
    return sel / sel.sum(dim=-1, keepdim=True).clamp(min=1)


def activation_ratio(shares: torch.Tensor, threshold: float) -> float:
    """Fraction of (layer, expert) cells whose share is >= threshold x the uniform share 1/E."""
    E = shares.shape[-1]
    return float((shares >= threshold / E).double().mean())


def effective_experts(shares: torch.Tensor) -> torch.Tensor:
    """(L,) exp(entropy of the shares): E for uniform routing, 1 for collapse onto one expert."""
    p = shares.double()
    ent = -(p * torch.log(p.clamp(min=1e-30))).sum(dim=-1)
    return torch.exp(ent)


def mean_divergence(hist: torch.Tensor) -> float:
    """Average number of distinct experts per token from a divergence histogram."""
    h = hist.double()
    total = h.sum()
    return float((h * torch.arange(h.numel(), dtype=torch.float64, device=h.device)).sum() / total) if total > 0 else 0.0


def divergence_histogram(experts: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(n*h, k) expert ids of token-major sub-tokens -> (h*k+1,) histogram of distinct experts per token."""
    S, k = experts.shape
    per_token = experts.reshape(S // num_heads, num_heads * k)  # (n, h*k)
    s, _ = per_token.sort(dim=1)
    distinct = 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)  # (n,)
    return fixed_bincount(distinct, num_heads * k + 1)


def maxvio(counts: torch.Tensor) -> torch.Tensor:
    """(..., E) per-expert loads -> (...,) max load / mean load - 1 (0 = perfectly balanced; 0 with no load)."""
    c = counts.double()
    mean = c.mean(dim=-1)
    return torch.where(mean > 0, c.max(dim=-1).values / mean.clamp(min=1e-30) - 1.0, torch.zeros_like(mean))


def histogram_mean_max(hist: torch.Tensor) -> tuple[float, int]:
    """A histogram over bins 0, 1, 2, ... (counts per value) -> (mean value, largest value with a count);
    (0.0, 0) when empty."""
    c = hist.double()
    total = float(c.sum())
    if total <= 0:
        return 0.0, 0
    values = torch.arange(c.numel(), dtype=torch.float64, device=c.device)
    return float((values * c).sum()) / total, int(torch.nonzero(c).max())


def fanout_metrics(groups_hist: torch.Tensor, ranks_hist: torch.Tensor) -> dict:
    """(..., h*k+1) fan-out histograms (summed over what ... indexes: layers) -> mean and max per token of
    the distinct expert groups and EP ranks its sub-tokens reach."""
    g_mean, g_max = histogram_mean_max(groups_hist.reshape(-1, groups_hist.shape[-1]).sum(0))
    r_mean, r_max = histogram_mean_max(ranks_hist.reshape(-1, ranks_hist.shape[-1]).sum(0))
    return {"fanout_groups_mean": g_mean, "fanout_groups_max": g_max,
            "fanout_ranks_mean": r_mean, "fanout_ranks_max": r_max}


def step_sum(stats: Sequence[MoEStats], micro_batches: int, field: str) -> torch.Tensor:
    """(L, E) per-expert counts `field` summed over a step's micro-batches (stats: L layers per micro-batch,
    in order)."""
    L = len(stats) // micro_batches
    return torch.stack([getattr(s, field).double() for s in stats]).view(micro_batches, L, -1).sum(0)


def step_kept_counts(stats: Sequence[MoEStats], micro_batches: int) -> Optional[torch.Tensor]:
    """(L, E) kept counts summed over a step's micro-batches; None without MoE layers."""
    return step_sum(stats, micro_batches, "kept") if stats else None


def step_selection_counts(stats: Sequence[MoEStats], micro_batches: int) -> torch.Tensor:
    """(L, E) assignments before capacity summed over a step's micro-batches (the bias update's counts)."""
    return step_sum(stats, micro_batches, "selections")


def head_shares(head_counts: torch.Tensor) -> torch.Tensor:
    """(..., h, E) (head, expert) counts -> each head's shares over the experts (rows sum to 1)."""
    c = head_counts.double()
    return c / c.sum(dim=-1, keepdim=True).clamp(min=1)


def mutual_information_bits(head_counts: torch.Tensor) -> float:
    """I(head; expert) = sum_{j,e} p(j,e) log2(p(j,e) / (p(j) p(e))) from (h, E) counts; 0 with no counts."""
    c = head_counts.double()
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c / total
    pj, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    return float((p[nz] * torch.log2(p[nz] / (pj * pe)[nz])).sum())


def head_metrics(head_counts: torch.Tensor, threshold: float) -> dict:
    """(L, h, E) -> the per-head activation ratio (cells (layer, head, expert) with a head's share >=
    threshold/E), per-head effective experts (mean over layers and heads) and the layers' mean I(head; expert)."""
    shares = head_shares(head_counts)
    return {"head_activation_ratio": activation_ratio(shares, threshold),
            "head_effective_experts": float(effective_experts(shares).mean()),
            "mi_head_expert_bits": sum(mutual_information_bits(c) for c in head_counts) / head_counts.shape[0]}


def summarize(stats: Sequence[MoEStats], threshold: float, step_kept: Optional[torch.Tensor] = None,
              step_selections: Optional[torch.Tensor] = None) -> dict:
    """Scalars for logging, over the MoE layers of one step.

    MaxVio (DeepSeek-V3's loss-free balancing paper, Wang et al. 2024, arXiv 2408.15664: max load / mean load
    - 1) is on the ROUTED load, all k choices before capacity -- what the bias and the losses balance.
    step_selections: (L, E) those over the step's micro-batches and DP (moe/layer{i}/maxvio, moe/maxvio_global:
    their mean over layers); moe/maxvio_micro is the mean over layers and micro-batches of each micro-batch's.
    step_kept: (L, E) the counts kept after capacity over the step (moe/maxvio_kept_global: what the experts
    actually processed; at most the routed figure's imbalance when capacity clips the crowded experts)."""
    if not stats:
        return {}
    selections = torch.stack([s.selections for s in stats])  # (L, E)
    shares = expert_shares(selections)
    div = torch.stack([s.divergence for s in stats]).sum(0)
    dropped = sum(s.dropped for s in stats)
    total = int(selections.sum())
    out = {
        "moe/activation_ratio": activation_ratio(shares, threshold),
        "moe/activation_threshold": threshold,
        "moe/effective_experts": float(effective_experts(shares).mean()),
        "moe/divergence": mean_divergence(div),
        "moe/dropped_fraction": dropped / total if total else 0.0,
        "moe/max_share_x_uniform": float(shares.max() * shares.shape[-1]),
        "moe/maxvio_micro": float(maxvio(selections).mean()),
    }
    if stats[0].head_counts is not None:
        out.update({f"moe/{k}": v for k, v in head_metrics(torch.stack([s.head_counts for s in stats]),
                                                           threshold).items()})
    if stats[0].fanout_groups is not None:
        out.update({f"moe/{k}": v for k, v in fanout_metrics(torch.stack([s.fanout_groups for s in stats]),
                                                             torch.stack([s.fanout_ranks for s in stats])).items()})
    if step_selections is not None:
        vio = maxvio(step_selections)
        out["moe/maxvio_global"] = float(vio.mean())
        out.update({f"moe/layer{i}/maxvio": float(v) for i, v in enumerate(vio)})
    if step_kept is not None:
        out["moe/maxvio_kept_global"] = float(maxvio(step_kept).mean())
    return out


def routing_report(selections: torch.Tensor, divergence: torch.Tensor, threshold: float,
                   head_counts: Optional[torch.Tensor] = None, kept: Optional[torch.Tensor] = None,
                   fanout_groups: Optional[torch.Tensor] = None, fanout_ranks: Optional[torch.Tensor] = None) -> dict:
    """The validation set's routing as plain JSON: per-layer expert shares and the paper's metrics.

    selections: (L, E) assignments per layer and expert; divergence: (L, h*k+1) tokens by number of
    distinct experts their sub-tokens reached; head_counts: (L, h, E) assignments of head j to expert e;
    kept: (L, E) assignments processed after capacity, summed over the validation batches (maxvio_kept;
    `maxvio` is on the routed selections);
    fanout_groups / fanout_ranks: (L, h*k+1) tokens by distinct expert groups / EP ranks reached.
    """
    shares = expert_shares(selections)  # (L, E)
    eff = effective_experts(shares)  # (L,)
    hist = divergence.sum(0)  # (h*k+1,)
    out = {
        "source": "validation set, final weights",
        "threshold": threshold,
        "activation_ratio": activation_ratio(shares, threshold),
        "effective_experts": float(eff.mean()),
        "effective_experts_per_layer": [float(v) for v in eff],
        "divergence": mean_divergence(hist),
        "shares": [[float(v) for v in row] for row in shares],
        "divergence_hist": {"bins": list(range(hist.numel())), "counts": [int(v) for v in hist]},
    }
    vio = maxvio(selections)  # the routed load (see summarize)
    out["maxvio"] = float(vio.mean())
    out["maxvio_per_layer"] = [float(v) for v in vio]
    if kept is not None:
        out["maxvio_kept"] = float(maxvio(kept).mean())
    if fanout_groups is not None and fanout_ranks is not None:
        out.update(fanout_metrics(fanout_groups, fanout_ranks))
    if head_counts is not None:
        out.update(head_metrics(head_counts, threshold))
        out["mi_head_expert_bits_per_layer"] = [mutual_information_bits(c) for c in head_counts]
        out["head_shares"] = [[[float(v) for v in row] for row in layer] for layer in head_shares(head_counts)]
    return out


def write_head_heatmap(head_counts: torch.Tensor, path: str) -> None:
    """One PNG, a subplot per MoE layer: head x expert shares (each head's row sums to 1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = head_shares(head_counts).numpy()  # (L, h, E)
    L = shares.shape[0]
    fig, axes = plt.subplots(1, L, figsize=(3 + 2.5 * L, 3), squeeze=False)
    for i, ax in enumerate(axes[0]):
        im = ax.imshow(shares[i], aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_title(f"MoE layer {i}")
        ax.set_xlabel("expert")
        ax.set_ylabel("head (sub-token j)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
