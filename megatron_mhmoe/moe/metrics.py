"""Routing statistics: what the layer returns each step, and the paper's metrics computed from it.

Expert activation is measured on *shares*: the fraction of a layer's routed assignments that each
expert received, compared with the uniform share 1/E. The paper's own "selections / tokens above a
threshold" grows with h*k by construction, so it cannot compare h=1 with h>1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class MoEStats:
    """Returned by one MoE layer's forward (replica-wide: summed over the TP ranks of a replica)."""

    aux_loss: torch.Tensor
    """Load-balance loss E * sum f_e P_e (0-dim, differentiable)."""
    z_loss: torch.Tensor
    """Router z-loss mean(logsumexp(logits)^2) (0-dim, differentiable)."""
    selections: torch.Tensor
    """(E,) assignments (sub-token choices) routed to each expert, before capacity."""
    kept: torch.Tensor
    """(E,) assignments each expert processed, after capacity."""
    divergence: torch.Tensor
    """(h*k+1,) tokens by the number of distinct experts their h*k assignments went to."""
    num_tokens: int
    num_sub_tokens: int

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
    return torch.bincount(distinct, minlength=num_heads * k + 1)


def summarize(stats: Sequence[MoEStats], threshold: float) -> dict:
    """Scalars for logging, over the MoE layers of one step."""
    if not stats:
        return {}
    selections = torch.stack([s.selections for s in stats])  # (L, E)
    shares = expert_shares(selections)
    div = torch.stack([s.divergence for s in stats]).sum(0)
    dropped = sum(s.dropped for s in stats)
    total = int(selections.sum())
    return {
        "moe/activation_ratio": activation_ratio(shares, threshold),
        "moe/activation_threshold": threshold,
        "moe/effective_experts": float(effective_experts(shares).mean()),
        "moe/divergence": mean_divergence(div),
        "moe/dropped_fraction": dropped / total if total else 0.0,
        "moe/max_share_x_uniform": float(shares.max() * shares.shape[-1]),
    }


def routing_report(selections: torch.Tensor, divergence: torch.Tensor, threshold: float) -> dict:
    """The validation set's routing as plain JSON: per-layer expert shares and the paper's metrics.

    selections: (L, E) assignments per layer and expert; divergence: (L, h*k+1) tokens by number of
    distinct experts their sub-tokens reached.
    """
    shares = expert_shares(selections)  # (L, E)
    eff = effective_experts(shares)  # (L,)
    hist = divergence.sum(0)  # (h*k+1,)
    return {
        "source": "validation set, final weights",
        "threshold": threshold,
        "activation_ratio": activation_ratio(shares, threshold),
        "effective_experts": float(eff.mean()),
        "effective_experts_per_layer": [float(v) for v in eff],
        "divergence": mean_divergence(hist),
        "shares": [[float(v) for v in row] for row in shares],
        "divergence_hist": {"bins": list(range(hist.numel())), "counts": [int(v) for v in hist]},
    }
