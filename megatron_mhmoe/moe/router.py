"""Routers (gates): sub-token -> expert logits, and top-k selection. Local maths only, no communication.

All router maths runs in fp32 whatever the model dtype: softmax over hundreds of experts and the
cosine/temperature scores lose their ranking in bf16, and the balance loss multiplies small numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_mhmoe.moe import head_affine
from megatron_mhmoe.moe.quantile_balancing import required_bias_histogram
from megatron_mhmoe.moe.softmax_top_k import softmax_top_k
from megatron_mhmoe.parallel.init import constant, normal, set_init


# F.normalize divides by max(|z|, eps), so eps also caps the Jacobian of z / |z| at 1/eps. A projected
# sub-token z = W x has the scale |W||x| ~ init_std * sqrt(d_sub * gate_dim) * rms(x), about 0.1-1;
# bf16 inputs resolve z only to ~2^-8 of that scale (4e-4 at the low end), fp32 to ~2^-24 of it.
# 1e-4 is below bf16's resolution, so every sub-token whose direction bf16 can resolve is scored as
# z / |z| exactly, and an exactly-zero sub-token (zero input through the zero-initialised head bias)
# gets at most 1e4 x the gradient reaching z / |z|, not torch's default 1e12 x, which made the global
# gradient norm ~1e10 so that clipping shrank every other gradient to nothing.
NORMALIZE_EPS = 1e-4


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


class XMoEGate(nn.Module):
    """X-MoE gate (Chi et al. 2022): cosine routing in a low-dimensional space with a learnable temperature.

    score(x, e) = <W x / |W x|, m_e / |m_e|> / tau. Projecting to gate_dim (16) before scoring keeps
    the router from collapsing onto the few directions that dominate the hidden space.
    """

    def __init__(self, d_sub: int, num_experts: int, gate_dim: int, temperature: float, init_std: float):
        super().__init__()
        self.proj = nn.Linear(d_sub, gate_dim, bias=False)
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, gate_dim))
        # Shape (1,), not 0-dim: DeepSpeed broadcasts params as byte views, which 0-dim tensors refuse.
        self.temperature = nn.Parameter(torch.tensor([float(temperature)]))
        set_init(self.proj.weight, normal(init_std))
        set_init(self.expert_embeddings, normal(init_std))
        set_init(self.temperature, constant(temperature))

    def forward(self, x_sub: torch.Tensor) -> torch.Tensor:  # (S, d/h) -> (S, E) fp32
        with torch.autocast(device_type=x_sub.device.type, enabled=False):
            z = F.normalize(F.linear(_fp32(x_sub), _fp32(self.proj.weight)), dim=-1, eps=NORMALIZE_EPS)
            m = F.normalize(_fp32(self.expert_embeddings), dim=-1, eps=NORMALIZE_EPS)  # (E, gate_dim)
            # A temperature that trains towards 0 would blow the logits up: keep it positive.
            tau = _fp32(self.temperature).clamp(min=1e-2)
            return (z @ m.t()) / tau  # (S, E)


class SigmoidGate(nn.Module):
    """Linear(d/h, E, bias=False) scored per expert by sigmoid(logits) (DeepSeek-V3): the experts do not
    compete inside one softmax, so a score says how well the sub-token fits that expert alone."""

    def __init__(self, d_sub: int, num_experts: int, init_std: float):
        super().__init__()
        self.proj = nn.Linear(d_sub, num_experts, bias=False)
        set_init(self.proj.weight, normal(init_std))

    def forward(self, x_sub: torch.Tensor) -> torch.Tensor:  # (S, d/h) -> (S, E) fp32 logits
        with torch.autocast(device_type=x_sub.device.type, enabled=False):
            return F.linear(_fp32(x_sub), _fp32(self.proj.weight))


class SoftmaxGate(nn.Module):
    """Linear(d/h, E, bias=False); probabilities are the softmax of its logits (the paper's Eq. 5)."""

    def __init__(self, d_sub: int, num_experts: int, init_std: float):
        super().__init__()
        self.proj = nn.Linear(d_sub, num_experts, bias=False)
        set_init(self.proj.weight, normal(init_std))

    def forward(self, x_sub: torch.Tensor) -> torch.Tensor:  # (S, d/h) -> (S, E) fp32
        with torch.autocast(device_type=x_sub.device.type, enabled=False):
            return F.linear(_fp32(x_sub), _fp32(self.proj.weight))


@dataclass
class TopK:
    """Routing decision for S sub-tokens (all fp32 / int64)."""

    probs: torch.Tensor
    """(S, E) what the balance loss reads as P: the softmax of the logits, or for the sigmoid gate the
    scores normalised over the experts, sigmoid(l) / sum_e sigmoid(l_e)."""
    experts: torch.Tensor
    """(S, k) chosen expert ids, best first."""
    gates: torch.Tensor
    """(S, k) combine weights: the chosen probabilities (softmax, X-MoE) or scores (sigmoid), renormalised
    over the k when k > 1 (at k = 1 the raw probability / score), times gate_scaling."""
    lse: torch.Tensor
    """(S,) logsumexp of the logits (for the z-loss), from the top-1 choice in O(S) after a softmax."""
    unbiased_experts: Optional[torch.Tensor] = None
    """(S, k) the top-k of the unbiased scores over all experts (what the balance losses count, DeepSeek-V3
    Eq. 18) when it can differ from `experts` (a bias, a group limit or debug routing chose them); None =
    the same as `experts`."""
    required_bias_hist: Optional[torch.Tensor] = None
    """(E x bins,) int64 quantile balancing's histogram of this forward's sub-tokens (MoEConfig.quantile_balancing,
    moe/quantile_balancing.py); None without it."""


def top_k(logits: torch.Tensor, k: int) -> TopK:
    """Softmax gate's decision: top_k_reference's values as one autograd node for the softmax, the top-k
    and the logsumexp (moe/softmax_top_k.py: the backward builds no dense zero tensors)."""
    probs, top_p, top_e, lse = softmax_top_k(logits, k)  # (S, E), (S, k), (S, k), (S,)
    gates = top_p / top_p.sum(dim=-1, keepdim=True) if k > 1 else top_p
    return TopK(probs=probs, experts=top_e, gates=gates, lse=lse)


def top_k_reference(logits: torch.Tensor, k: int) -> TopK:
    """top_k as separate autograd ops: the obvious version the fused one is tested against. Everything
    after the logits is O(S x k) except the softmax and the top-k selection themselves."""
    probs = torch.softmax(logits, dim=-1)  # (S, E)
    top_p, top_e = probs.topk(k, dim=-1)  # (S, k)
    gates = top_p / top_p.sum(dim=-1, keepdim=True) if k > 1 else top_p
    # logsumexp(l) = l_e - log p_e for any e; e = the top-1 choice has p_e >= 1/E, so the log is
    # well conditioned. Its gradient is softmax(l), as logsumexp's: d(l_e - log p_e)/dl = onehot_e -
    # (onehot_e - p) = p. This replaces a second O(S x E) exp pass (torch.logsumexp) and its backward.
    lse = logits.gather(1, top_e[:, :1]).squeeze(1) - torch.log(top_p[:, 0])  # (S,)
    return TopK(probs=probs, experts=top_e, gates=gates, lse=lse)


def top_k_sigmoid(logits: torch.Tensor, k: int, scaling: float = 1.0) -> TopK:
    """DeepSeek-V3 scoring (Eqs. 15-16): s = sigmoid(l), top-k on s, gates = s_top / sum(s_top) x scaling
    for k > 1 and s_top x scaling at k = 1 (Megatron-core's topk_routing_with_score_function: normalising
    one score would make every gate the constant `scaling`, and the LM loss would not reach the router).

    The balance loss needs a distribution over experts: P is s / sum_e s (a sub-token's share of its own
    scores). The z-loss keeps penalising the logits' scale, logsumexp(l) as for the softmax gates; without
    a softmax there is no top-1 probability to get it from, so it is the O(S x E) torch.logsumexp.
    """
    scores = torch.sigmoid(logits)  # (S, E)
    top_s, top_e = scores.topk(k, dim=-1)  # (S, k)
    gates = _scaled(_normalised(top_s), scaling)
    probs = scores / scores.sum(dim=-1, keepdim=True)
    return TopK(probs=probs, experts=top_e, gates=gates, lse=torch.logsumexp(logits, dim=-1))


def _normalised(top: torch.Tensor) -> torch.Tensor:
    """(S, k) chosen probabilities / scores -> renormalised over the k when k > 1, unchanged at k = 1."""
    return top / top.sum(dim=-1, keepdim=True) if top.shape[1] > 1 else top


def _scaled(gates: torch.Tensor, scaling: float) -> torch.Tensor:
    return gates if scaling == 1.0 else gates * scaling


def choose(logits: torch.Tensor, moe, first_index: int = 0, bias: torch.Tensor | None = None,
           head_groups: int | None = None) -> TopK:
    """The routing decision of MoEConfig `moe` for S sub-tokens (token-major: a token's h sub-tokens are
    adjacent rows) whose replica-wide indices start at `first_index`.

    Which experts: the gate's own top-k, or with `bias` (aux-loss-free balancing, (E,) fp32) and/or
    `moe.route_group_limit` the top-k of the selection scores (scores + bias, limited to the token's
    groups: group_limited_scores), or with `moe.debug_routing` the debug choice (see debug_experts).
    The gate weights always come from the unbiased scores of the chosen experts; whenever the choice can
    differ from the unbiased top-k, that top-k is kept too (TopK.unbiased_experts) for the balance losses.

    head_groups: G of head-affine routing (moe/head_affine.py; the layer resolves model.moe.head_groups,
    which may be 'nodes'); None = moe.head_groups, which must then be an integer. G > 1 routes every
    sub-token with the logits of the other groups' experts at -inf: the router over its head's group alone
    (softmax probabilities, P of the balance losses, the z-loss's logsumexp and the k = 1 gate normalised
    inside the group; the choice and the unbiased top-k the losses count inside it). G <= 1 is the shared
    pool, computed exactly as without the option."""
    k, E = moe.top_k, logits.shape[1]
    G = head_groups if head_groups is not None else _int_head_groups(moe)
    affine = G > 1
    if affine:
        # Normalising over all E would leave most of a head's probability on experts it may never choose,
        # where the balance loss's pull on the ones it may choose is weak: a first probe (E=64, G=2, global
        # softmax) activated 28% of the experts against 91% for the shared pool.
        logits = head_affine.affine_scores(logits, moe.num_heads, G, first_index)  # (S, E), -inf outside
    if moe.debug_routing:
        if affine:
            experts = head_affine.debug_in_groups(
                debug_experts(logits.shape[0], k, E // G, moe.debug_routing, moe.debug_skew_fraction, first_index,
                              logits.device), moe.num_heads, G, E, first_index)
        else:
            experts = debug_experts(logits.shape[0], k, E, moe.debug_routing, moe.debug_skew_fraction,
                                    first_index, logits.device)
        # The router still runs (its cost stays in the timing) and still weighs the forced choice, so the
        # gradients and losses keep their usual form; only which experts is replaced.
        scores = _scores(logits, moe)
        return _weigh(logits, scores, experts, moe, _unbiased_top_k(_in_group(scores, moe, G, first_index), k))
    if bias is None and not moe.route_group_limit and not affine:
        if moe.gate == "sigmoid":
            return top_k_sigmoid(logits, k, moe.gate_scaling)
        choice = top_k(logits, k)
        return choice if moe.gate_scaling == 1.0 else TopK(choice.probs, choice.experts,
                                                           _scaled(choice.gates, moe.gate_scaling), choice.lse)
    scores = _scores(logits, moe)  # (S, E)
    with torch.no_grad():  # the choice is not differentiable; only the weights of the chosen are
        select = scores if bias is None else scores + bias.to(scores.dtype)  # (S, E)
        if moe.route_group_limit:
            select = group_limited_scores(select, moe.route_groups, moe.route_group_limit, moe.num_heads, k)
        if affine:
            select = head_affine.affine_scores(select, moe.num_heads, G, first_index)
        experts = select.topk(k, dim=-1).indices  # (S, k)
        hist = required_bias_histogram(scores, select, k, bias, moe.quantile_bins) \
            if moe.quantile_balancing and bias is not None else None
    choice = _weigh(logits, scores, experts, moe, _unbiased_top_k(_in_group(scores, moe, G, first_index), k))
    choice.required_bias_hist = hist
    return choice


def _int_head_groups(moe) -> int:
    G = getattr(moe, "head_groups", 0)
    if isinstance(G, str):
        raise ValueError(f"model.moe.head_groups={G!r} depends on the node layout: pass the resolved G "
                         f"(choose(..., head_groups=...); MHMoELayer does, from its dispatcher's layout)")
    return G


def _in_group(scores: torch.Tensor, moe, G: int, first_index: int) -> torch.Tensor:
    """Scores as the head-affine rule sees them: outside the head's group -inf (G > 1), else unchanged.
    The group is part of the routing rule, not a balancing device, so the unbiased top-k that the balance
    losses count stays inside it too."""
    return head_affine.affine_scores(scores, moe.num_heads, G, first_index) if G > 1 else scores


def _unbiased_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    with torch.no_grad():
        return scores.topk(k, dim=-1).indices  # (S, k)


def _scores(logits: torch.Tensor, moe) -> torch.Tensor:
    """(S, E) what the top-k ranks: sigmoid scores for 'sigmoid', softmax probabilities otherwise."""
    return torch.sigmoid(logits) if moe.gate == "sigmoid" else torch.softmax(logits, dim=-1)


def _weigh(logits: torch.Tensor, scores: torch.Tensor, experts: torch.Tensor, moe,
           unbiased_experts: torch.Tensor) -> TopK:
    """Probabilities, gates and lse for experts chosen by something other than the scores' own top-k.

    Softmax with a group limit and k > 1 renormalises the chosen probabilities over the k, as Megatron-core
    does by default (the softmax of the chosen logits); it keeps them unnormalised only with its
    moe_router_pre_softmax, which this project does not offer at k > 1."""
    top = scores.gather(1, experts)  # (S, k)
    probs = scores / scores.sum(dim=-1, keepdim=True) if moe.gate == "sigmoid" else scores
    # The chosen expert may have a tiny probability: l_e - log p_e would be ill-conditioned there.
    return TopK(probs=probs, experts=experts, gates=_scaled(_normalised(top), moe.gate_scaling),
                lse=torch.logsumexp(logits, dim=-1), unbiased_experts=unbiased_experts)


def group_limited_scores(select: torch.Tensor, groups: int, limit: int, heads: int, k: int) -> torch.Tensor:
    """(S, E) selection scores of S = n*h token-major sub-tokens -> the same with every expert outside its
    token's `limit` best groups set to -inf, so that a top-k of the result stays inside those groups.

    1. A sub-token scores group g by the sum of its best n = max(1, k // M) scores inside g (DeepSeek-V3
       section 2.1.2: "the sum of the highest K_r/M affinity scores"; Megatron-core's group_limited_topk:
       topk // group_topk). At k < M Megatron-core's k // M = 0 scores every group 0 (the groups are then
       picked by index); here n = 1, a group's best score.
    2. A token scores g by the sum over its h sub-tokens: the groups are chosen per token, not per sub-token,
       so that all of a token's sub-tokens (and its traffic) go to the same M groups.
    3. The token's M best groups stay; the other groups' experts get -inf.
    """
    S, E = select.shape
    per = E // groups
    n = S // heads
    # 1. (validation guarantees n <= E/G: M groups of E/G must hold k experts)
    sub_group = select.view(S, groups, per).topk(group_score_size(k, limit), dim=-1).values.sum(-1)  # (S, G)
    # 2.
    token_group = sub_group.view(n, heads, groups).sum(1)  # (n, G)
    # 3.
    best = token_group.topk(limit, dim=-1).indices  # (n, M)
    allowed = torch.zeros(n, groups, dtype=torch.bool, device=select.device).scatter_(1, best, True)  # (n, G)
    allowed = allowed.repeat_interleave(heads, 0).repeat_interleave(per, 1)  # (S, E)
    return select.masked_fill(~allowed, float("-inf"))


def group_score_size(k: int, limit: int) -> int:
    """How many of a sub-token's best scores in a group make the group's score: max(1, k // M)."""
    return max(1, k // limit)


def group_limited_reference(select: torch.Tensor, groups: int, limit: int, heads: int, k: int) -> torch.Tensor:
    """Slow reference of group-limited top-k: (S, k) expert ids by loops over tokens, groups and experts."""
    S, E = select.shape
    per = E // groups
    out = torch.empty(S, k, dtype=torch.long)
    for t in range(S // heads):
        rows = range(t * heads, (t + 1) * heads)
        score = []
        for g in range(groups):
            total = 0.0
            for i in rows:
                total += sum(sorted((float(select[i, e]) for e in range(g * per, (g + 1) * per)),
                                    reverse=True)[:max(1, k // limit)])
            score.append(total)
        chosen = sorted(range(groups), key=lambda g: -score[g])[:limit]
        pool = [e for g in sorted(chosen) for e in range(g * per, (g + 1) * per)]
        for i in rows:
            ranked = sorted(pool, key=lambda e: -float(select[i, e]))
            out[i] = torch.tensor(ranked[:k])
    return out


def debug_experts(S: int, k: int, E: int, mode: str, skew_fraction: float, first_index: int,
                  device=None) -> torch.Tensor:
    """(S, k) forced expert ids for the sub-tokens with replica-wide indices first_index .. first_index+S-1.

    'balanced': sub-token i's j-th choice is (i k + j) mod E, so over a replica of S_r sub-tokens the
    S_r k assignments are consecutive integers mod E: every expert gets floor or ceil(S_r k / E).
    'skew': sub-token i is skewed when floor((i+1) f) > floor(i f) (floor(S_r f) of them in all, spread
    evenly); a skewed one's j-th choice is expert j (its first choice expert 0). The others, numbered
    r = i - floor(i f) among themselves, are balanced: (r k + j) mod E. Indices are replica-wide so the
    decision does not depend on how TP splits the tokens. Choices stay distinct when k <= E.
    """
    i = torch.arange(first_index, first_index + S, device=device, dtype=torch.int64)  # (S,)
    j = torch.arange(k, device=device, dtype=torch.int64)  # (k,)
    if mode == "balanced":
        return (i[:, None] * k + j[None, :]) % E
    if mode != "skew":
        raise ValueError(f"debug_routing={mode!r} is not one of ['', 'balanced', 'skew']")
    before = torch.floor(i.double() * skew_fraction).long()  # skewed sub-tokens with index < i
    skewed = torch.floor((i + 1).double() * skew_fraction).long() > before  # (S,)
    r = i - before
    balanced = (r[:, None] * k + j[None, :]) % E
    return torch.where(skewed[:, None], j[None, :].expand(S, k), balanced)
