"""Quantile balancing (Kimi K3 technical report, section 2.3.3, Eqs. 13-14 and Appendix D; the forms followed
here: torchtitan PR 4577's histogram estimator and Transformer Engine PR 3395's description of it, and
Megatron-core dev PR 6637's once-per-global-batch update): the per-expert routing bias b (the same buffer
as aux-loss-free balancing, moe/bias_balancing.py) is SET once per global batch, not nudged, to the value
that would have given every expert the balanced load q = m k / E of that batch's m sub-tokens.

For sub-token t with selection scores s_t + b (k chosen), the cutoff c_t is its (k+1)-th largest selection
score: with the other experts' biases fixed, expert e is among t's top-k exactly when b_e > c_t - s_{t,e}
=: r_{t,e}, the bias e needs to take t. So the bias that gives e exactly q sub-tokens is the q-th smallest
r_{.,e} (the k/E quantile of its column). Every sub-token adds its r_{t,e} to a per-expert histogram of
B bins over [min(b) - 1, max(b) + 1] (Appendix D's range: scores lie in [0, 1], so every r does too); the
histograms of all micro-batches and ranks are summed (one all-reduce per step, moe/balancing.py), the
quantile is read off each expert's cumulative histogram with linear interpolation inside the bin, and the
biases are mean-centred (only differences between experts matter to a top-k).

Integer histograms sum exactly in any order, so the new bias does not depend on how the global batch is
split over ranks and micro-batches.
"""
from __future__ import annotations

import torch


def bias_range(bias: torch.Tensor) -> tuple[float, float]:
    """[lo, hi] of the histogram for the bias in force: [min(b) - 1, max(b) + 1]."""
    b = bias.double()
    return float(b.min()) - 1.0, float(b.max()) + 1.0


def required_bias(scores: torch.Tensor, select: torch.Tensor, k: int) -> torch.Tensor:
    """(S, E) r_{t,e} = c_t - s_{t,e}: the bias expert e needs to enter sub-token t's top-k, with c_t the
    (k+1)-th largest selection score (scores + bias) of t."""
    cutoff = select.topk(k + 1, dim=-1).values[:, k:]  # (S, 1)
    return cutoff - scores  # (S, E)


def required_bias_histogram(scores: torch.Tensor, select: torch.Tensor, k: int, bias: torch.Tensor,
                            bins: int) -> torch.Tensor:
    """(E * bins,) int64: per expert e (row-major), how many sub-tokens' r_{t,e} fall in each bin."""
    S, E = scores.shape
    lo, hi = bias_range(bias)
    r = required_bias(scores.double(), select.double(), k)  # (S, E)
    idx = ((r - lo) * (bins / (hi - lo))).floor().clamp_(0, bins - 1).long()  # (S, E)
    flat = (torch.arange(E, device=scores.device) * bins)[None, :] + idx  # (S, E)
    return torch.bincount(flat.reshape(-1), minlength=E * bins)


def quantile_bias(hist: torch.Tensor, k: int, lo: float, hi: float) -> torch.Tensor:
    """(E, B) summed histograms of the global batch -> the new (E,) fp32 bias, mean-centred.

    1. m = sub-tokens (each counts once per expert row), q = m k / E.
    2. Per expert, the first bin j whose cumulative count reaches q; inside it, linear interpolation:
       v_e = lo + (j + (q - cum_{j-1}) / hist_j) x width.
    3. b = v - mean(v)."""
    h = hist.double()
    E, B = h.shape
    width = (hi - lo) / B
    # 1.
    m = h[0].sum()
    if m <= 0:
        return torch.zeros(E, dtype=torch.float32, device=hist.device)
    q = m * k / E
    # 2.
    cum = h.cumsum(dim=1)  # (E, B)
    j = torch.searchsorted(cum, torch.full((E, 1), float(q), dtype=torch.float64, device=h.device)).clamp_(max=B - 1)
    before = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)), torch.zeros_like(j, dtype=torch.float64))
    inside = h.gather(1, j).clamp(min=1.0)
    v = lo + (j.double() + ((q - before) / inside).clamp(0.0, 1.0)) * width  # (E, 1)
    v = v.squeeze(1)
    # 3.
    return (v - v.mean()).float()


def quantile_bias_reference(r: torch.Tensor, k: int) -> torch.Tensor:
    """Slow reference from the exact r (m, E): per expert the q-th smallest r_{.,e} (q = m k / E rounded
    up), mean-centred. The histogram estimate lies within one bin width of it (before centring)."""
    m, E = r.shape
    q = max(1, -(-m * k // E))
    v = torch.stack([r[:, e].double().sort().values[q - 1] for e in range(E)])
    return (v - v.mean()).float()
