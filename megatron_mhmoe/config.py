"""Model configuration: dataclasses with a docstring per field, validated once with the arithmetic.

Parallel sizes are not model config: they live in ParallelContext. `validate_for_parallel` checks
that a model can be split the way a context asks.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Optional, Union


@dataclass
class MoEConfig:
    """Multi-Head Mixture-of-Experts FFN. h=1 without projections is SMoE/X-MoE."""

    num_experts: int = 8
    """E: experts per MoE layer (across all expert-parallel ranks)."""
    top_k: int = 2
    """Experts chosen per sub-token; gate values are renormalised over the k when k > 1 (at k = 1 the gate is
    the chosen probability or sigmoid score itself, times gate_scaling)."""
    num_heads: int = 4
    """h: sub-tokens per token. Must divide hidden_size; sub-token width is hidden_size / h."""
    head_projection: bool = True
    """Apply the head (d x d) and merge (d x d) projections. False with num_heads=1 gives plain SMoE."""
    expert_hidden_size: int = 256
    """Hidden width of each expert FFN (d/h -> expert_hidden_size -> d/h)."""
    expert_activation: str = "gelu"
    """Expert FFN: 'gelu' (two matrices) or 'swiglu' (three matrices)."""
    num_shared_experts: int = 0
    """Shared experts (DeepSeekMoE): always-on experts beside the routed ones, 0 = none. They act on each
    sub-token (width d/h, between the head and merge projections) with gate weight 1 and the routed
    experts' shape (d/h -> shared_expert_hidden_size -> d/h, expert_activation): at h=1 this is
    DeepSeekMoE's token-level shared expert, and at h>1 a shared expert costs what one more top-k choice
    costs (h x one expert's FLOPs per token), so SMoE vs MH-MoE matching carries over unchanged. Their
    output joins the routed output before the merge projection. They need no all-to-all: replicated on
    every EP rank, reduced over DP (and summed over TP) like the router. Several are one fused FFN of
    width num_shared_experts x shared_expert_hidden_size (the same function as their sum)."""
    shared_expert_hidden_size: int = 0
    """Hidden width of each shared expert; 0 = expert_hidden_size."""
    gate: str = "xmoe"
    """Router: 'xmoe' (low-dim cosine routing, learnable temperature), 'softmax' (linear + softmax) or
    'sigmoid' (DeepSeek-V3: linear, scores s = sigmoid(logits) per expert, top-k on s, gates =
    s_top / sum(s_top) for k > 1 and s_top at k = 1 (Megatron-core: the LM loss then reaches the router);
    the balance loss's P_e is the mean of s_e / sum_e' s_e', the z-loss is on logsumexp(logits) as for the
    others)."""
    gate_scaling: float = 1.0
    """Every gate's combine weights are multiplied by this (DeepSeek-V3's routed scaling factor, meant for
    'sigmoid', whose weights sum to 1). 1.0 = unscaled."""
    gate_dim: int = 16
    """X-MoE gate: dimension the sub-token is projected to before cosine scoring."""
    gate_temperature: float = 0.3
    """X-MoE gate: initial temperature tau (scores = cosine / tau); learnable."""
    route_groups: int = 1
    """G: the experts form G contiguous groups of E/G (group g holds experts g*E/G .. (g+1)*E/G - 1), a
    routing setting of its own, not derived from the layout (set it to the number of nodes the EP group
    spans to make groups line up with nodes). Used by route_group_limit and by the fan-out metric
    (moe/fanout_groups_mean: distinct groups a token's h*k choices reach). 1 = one group."""
    route_group_limit: int = 0
    """M: token-level group-limited routing. Each token picks its M best groups from the combined scores of
    its h sub-tokens -- a sub-token scores group g by the sum of its best max(1, k // M) selection scores
    (scores + bias) in g (DeepSeek-V3 section 2.1.2, "the highest K_r/M", Megatron-core's topk // group_topk;
    at k < M, where those give 0, a group's best score), a token by the sum of its sub-tokens' -- then
    each sub-token takes its top-k among the experts of those M groups. At h = 1 this is DeepSeek-V3's
    node-limited routing. With groups = nodes a token's traffic reaches at most M nodes. 0 = off."""
    head_groups: Union[int, str] = 0
    """G: head-affine expert placement (moe/head_affine.py, docs/head-affine-placement.md). The experts form G
    contiguous groups of E/G and sub-token j of every token (head j) routes its top-k only among the experts
    of group j mod G: the router over that group alone (the logits of the other groups' experts at -inf, so
    probabilities, gates, the balance losses' P and f, the z-loss, capacity and statistics follow as for any
    routing). On an EP group over N nodes, group g lies on node
    g // (G/N): every sub-token's node is fixed by its head, and the cross-node exchange has fixed sizes
    and carries each sub-token once whatever top_k. G must divide num_heads and num_experts, hold top_k
    experts per group, and (EP over nodes) be a multiple of N. 'nodes' = N (1 inside one node). 0 or 1 =
    off (the shared pool). Excludes route_group_limit and quantile_balancing; with debug_routing the debug
    choice is drawn inside each head's group."""
    capacity_factor: float = 0.0
    """Per-expert capacity = ceil(cf * k * S / E) sub-tokens; overflow is dropped. <= 0 means dropless."""
    moe_every: int = 2
    """Every moe_every-th layer (layers moe_every-1, 2*moe_every-1, ...) has an MoE FFN; others are dense."""
    aux_loss_coef: float = 0.01
    """Coefficient of the micro-batch load-balance loss E * sum_e f_e P_e, summed over MoE layers: over
    the S = tokens*h sub-tokens of the routing group (the replica's micro-batch), f_e = balance counts of e
    / (k S) (balance_counting), P_e = mean router probability of e over them."""
    balance_counting: str = "topk"
    """What f_e of all three balance losses counts. 'topk' (DeepSeek-V3 Eq. 18, Megatron-core): the top-k of
    each sub-token's UNBIASED scores over all experts (no bias, no group limit), all k choices, f divided by
    k. 'first_choice' (GShard / Switch): the routed first choice (after bias and group limit), f divided by
    1 -- this project's rule before issue 22. The same at k = 1 without a bias or group limit."""
    seq_aux_loss_coef: float = 0.0
    """Coefficient of DeepSeek-V3's sequence-wise balance loss (1/B) sum_b E * sum_e f_{b,e} P_{b,e}, summed
    over MoE layers: per sequence b of the micro-batch, f_{b,e} = balance counts of e over its s*h
    sub-tokens / (k s h), P_{b,e} = their mean router probability of e. Counted over the whole
    sequence (all TP ranks of the replica, also with sequence parallelism). 0 = off."""
    global_aux_loss_coef: float = 0.0
    """Coefficient of the global-batch balance loss E * sum_e f_e^global P_e, summed over MoE layers. P_e:
    mean router probability over the routing group's (replica's) sub-tokens, as aux_loss_coef's, with the
    gradient. f_e^global, a constant: balance counts of e, counted over this micro-batch on every DP
    replica (all-reduced) plus the step's earlier micro-batches (running counts, reset each step;
    Megatron-core's approach), divided by k x those sub-tokens. 0 = off."""
    bias_update_rate: float = 0.0
    """gamma of aux-loss-free balancing (DeepSeek-V3): a per-expert fp32 bias b (a buffer, not a parameter;
    outside the optimizer) is added to the routing scores for choosing the top-k only (gate weights use the
    unbiased scores). After each optimizer step that was applied: b_e <- b_e + gamma * sign(mean_c - c_e),
    c_e = assignments (all k choices of every sub-token, before capacity) to expert e in the whole global
    batch -- every DP replica and every gradient-accumulation micro-batch -- and mean_c = sum_e c_e / E.
    The same counts on every rank give the same bias on every rank. Scores: the softmax probabilities
    ('xmoe', 'softmax') or the sigmoid scores ('sigmoid'). 0 = off (no bias)."""
    quantile_balancing: bool = False
    """Quantile balancing (Kimi K3 report section 2.3.3; moe/quantile_balancing.py): the routing bias b (as
    bias_update_rate's, choosing the top-k only) is SET after each applied optimizer step, from the global
    batch (every DP replica and micro-batch), to the bias that would have given each expert k/E of its
    sub-tokens: per expert the k/E quantile of c_t - s_{t,e} (c_t: sub-token t's (k+1)-th largest
    selection score), read from a histogram of quantile_bins bins, then mean-centred. Excludes
    bias_update_rate and route_group_limit; needs top_k < num_experts."""
    quantile_bins: int = 1000
    """Bins of quantile balancing's per-expert histograms over [min(b) - 1, max(b) + 1] (Kimi K3 Appendix D)."""
    z_loss_coef: float = 0.0
    """Coefficient of the router z-loss mean(logsumexp(logits)^2), summed over MoE layers. 0 = off."""
    activation_threshold: float = 0.5
    """An expert counts as active in a layer when its share of assignments is >= this x 1/E."""
    debug_routing: str = ""
    """Throughput/memory worst cases: '' (off), 'balanced' (sub-token i's j-th choice is expert
    (i*k + j) mod E, i counted over the replica) or 'skew' (a debug_skew_fraction of the sub-tokens put
    their first choice on expert 0, the rest balanced). The router still runs and weighs the forced
    experts; only its choice is replaced. Training refuses it without train.allow_debug_routing=true."""
    debug_skew_fraction: float = 0.5
    """'skew' debug routing: fraction in [0, 1] of sub-tokens whose j-th choice is expert j."""
    ep_ranks_per_node: int = 0
    """Ranks per node for the expert-parallel all-to-all (moe/two_level.py). An EP group that spans
    several nodes (EP > ranks per node, EP a multiple of it) dispatches in two levels: within the node,
    then one exchange per pair of nodes that carries each sub-token row once per destination node, then a
    local fan-out. 0 = the launcher's LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (deepspeed), flat when
    neither is set; EP groups inside one node keep the flat all-to-all."""
    a2a_chunks: int = 1
    """C: the two-level dispatch -> experts -> combine runs as C pipelined chunks of the sub-tokens, so
    that one chunk's (asynchronous) all-to-all overlaps another's expert GEMMs, in the forward and the
    backward. 1 = no pipelining."""
    ep_recv_budget: int = 0
    """Most sub-token rows one EP rank may receive for its experts per MoE forward (a bounded receive
    buffer). A rank over it raises an error naming this setting on every rank (instead of running out
    of memory). 0 = no budget."""
    ep_dispatch: str = "auto"
    """Expert-parallel path of an EP group that spans nodes (ep_ranks_per_node): 'flat' (one all-to-all over
    the EP group), 'two_level' (rail-aligned: a sub-token row once per destination node over the rank's own
    NIC to the same local rank there, which fans it out inside its node; moe/two_level.py) or 'auto' (the
    cheaper by moe/ep_cost.py's model, exchanges x ep_exchange_us + NIC bytes / ep_nic_gbps + node bytes /
    ep_node_gbps, priced per forward from its sub-token count, which every EP rank must share: fixed
    micro-batch shapes; then, with ep_tune_forwards > 0, the faster of the two as measured in the first
    forwards). EP groups inside one node always take the flat path. With head-affine placement
    (head_groups > 1 on the nodes) the node-aware path is the head-affine one (moe/head_affine_dispatch.py:
    fixed cross-node splits): 'two_level' takes it and 'auto' weighs it against flat."""
    ep_nic_gbps: float = 400.0
    """Cost model (ep_dispatch='auto'): each rank's own NIC, Gbit/s per direction (400 = one NDR NIC per GPU)."""
    ep_node_gbps: float = 3600.0
    """Cost model: between ranks of one node, Gbit/s per direction per rank (3600 = NVLink 4, 450 GB/s)."""
    ep_exchange_us: float = 30.0
    """Cost model: fixed cost of one all-to-all in microseconds (launch, synchronisation, latency)."""
    ep_tune_forwards: int = 3
    """ep_dispatch='auto' measures instead of trusting the cost model alone: for each forward shape, after one
    warm-up forward per path, this many forwards (with their backward) per path alternate flat and two-level,
    then every EP rank keeps the path that was faster on the slowest rank (moe/path_tuner.py). The cost model
    picks the path tried first. 0 = the cost model alone decides."""
    a2a_device_counts: bool = False
    """Dispatch without bringing the counts to the host (moe/padded_dispatch.py): every (rank, expert) pair
    gets capacity fixed slots, so the all-to-alls have equal splits and the receive buffer is EP x E_local x
    capacity rows whatever the routing (empty slots are zero rows the experts also compute). Needs a
    capacity_factor > 0; uses the flat exchange (not the two-level one). False = count-sized exchanges."""


@dataclass
class ModelConfig:
    """A GPT-style pre-norm decoder. `moe=None` gives a dense model."""

    vocab_size: int = 512
    """Tokenizer vocabulary. The embedding is padded up to a multiple of make_vocab_divisible_by x TP."""
    hidden_size: int = 128
    """d: residual stream width."""
    num_layers: int = 2
    """Transformer blocks."""
    num_attention_heads: int = 4
    """Attention heads; must be divisible by the tensor-parallel size."""
    ffn_hidden_size: int = 512
    """Hidden width of the dense FFN layers."""
    max_seq_len: int = 128
    """Longest sequence (size of learned position table, RoPE cache)."""
    activation: str = "gelu"
    """Dense FFN: 'gelu' or 'swiglu'."""
    norm: str = "layernorm"
    """'layernorm' or 'rmsnorm'."""
    norm_eps: float = 1e-5
    """Epsilon of the norms."""
    position_embedding: str = "learned"
    """'learned' absolute positions or 'rope' rotary embeddings."""
    rope_theta: float = 10000.0
    """RoPE base."""
    tie_embeddings: bool = True
    """Share the input embedding with the LM head."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches."""
    init_std: float = 0.02
    """Std of the normal init of embeddings and linear layers (output layers scaled by 1/sqrt(2L))."""
    make_vocab_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times TP (Megatron's convention)."""
    moe: Optional[MoEConfig] = None
    """MH-MoE settings; None for a dense model."""

    # ------------------------------------------------------------------ derived
    def padded_vocab_size(self, tp_size: int = 1) -> int:
        multiple = self.make_vocab_divisible_by * tp_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer % self.moe.moe_every == self.moe.moe_every - 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ------------------------------------------------------------------ validation
    def validate(self) -> "ModelConfig":
        _choice("activation", self.activation, ("gelu", "swiglu"))
        _choice("norm", self.norm, ("layernorm", "rmsnorm"))
        _choice("position_embedding", self.position_embedding, ("learned", "rope"))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                     "max_seq_len", "make_vocab_divisible_by"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads} ({self.hidden_size} % {self.num_attention_heads} = "
                f"{self.hidden_size % self.num_attention_heads})")
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim; hidden_size/heads = {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.moe is not None:
            _validate_moe(self.moe, self.hidden_size, self.num_layers)
        return self

    def validate_for_parallel(self, tp_size: int, ep_size: int) -> None:
        """Can this model be split over TP and EP? ValueError with the arithmetic if not."""
        self.validate()
        if self.num_attention_heads % tp_size:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by tensor-parallel size "
                f"{tp_size} ({self.num_attention_heads} % {tp_size} = {self.num_attention_heads % tp_size}); "
                f"each TP rank needs whole heads")
        if self.ffn_hidden_size % tp_size:
            raise ValueError(
                f"ffn_hidden_size {self.ffn_hidden_size} is not divisible by tensor-parallel size {tp_size} "
                f"({self.ffn_hidden_size} % {tp_size} = {self.ffn_hidden_size % tp_size})")
        padded = self.padded_vocab_size(tp_size)
        if padded % tp_size:  # cannot happen with the padding rule; kept as the invariant it is
            raise AssertionError(f"padded vocab {padded} not divisible by TP {tp_size}")
        if self.moe is not None and self.moe.num_experts % ep_size:
            raise ValueError(
                f"num_experts {self.moe.num_experts} is not divisible by expert-parallel size {ep_size} "
                f"({self.moe.num_experts} % {ep_size} = {self.moe.num_experts % ep_size}); each EP rank "
                f"holds num_experts / ep_size experts: pick an EP from "
                f"{[d for d in range(1, self.moe.num_experts + 1) if self.moe.num_experts % d == 0]}")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


def _validate_groups(moe: MoEConfig) -> None:
    from megatron_mhmoe.moe.head_groups_check import check_routing
    G, M, E, k = moe.route_groups, moe.route_group_limit, moe.num_experts, moe.top_k
    if G < 1 or E % G:
        raise ValueError(f"moe.route_groups={G} must be >= 1 and divide num_experts={E} "
                         f"({E} % {G} = {E % G if G >= 1 else 'n/a'}); each group holds E/G contiguous experts")
    if M < 0 or M > G:
        raise ValueError(f"moe.route_group_limit={M} must be in [0, route_groups={G}] (0 = off)")
    if M and M * (E // G) < k:
        raise ValueError(f"moe.route_group_limit={M} groups of E/G = {E}/{G} = {E // G} experts hold "
                         f"{M * (E // G)} experts, fewer than top_k={k}: raise route_group_limit or route_groups")
    head_groups = moe.head_groups
    if isinstance(head_groups, str) and head_groups != "nodes":
        raise ValueError(f"moe.head_groups={head_groups!r} must be an integer >= 0 or 'nodes' (the EP group's node count)")
    if isinstance(head_groups, int):
        if head_groups < 0:
            raise ValueError(f"moe.head_groups={head_groups} must be >= 0 (0 or 1 = off) or 'nodes'")
        check_routing(head_groups, moe.num_heads, E, k)
    if head_groups not in (0, 1) and M:
        raise ValueError(f"moe.head_groups={head_groups!r} (each head routes in its own group) and moe.route_group_limit="
                         f"{M} (each token picks M groups) both restrict the experts a sub-token may choose: turn one "
                         f"off (route_group_limit=0 with head_groups)")
    if head_groups not in (0, 1) and moe.quantile_balancing:
        raise ValueError(f"moe.head_groups={head_groups!r} with moe.quantile_balancing=true: the quantile assumes every "
                         f"expert can take every sub-token; use bias_update_rate or a balance loss with head_groups")
    if M and moe.debug_routing:
        raise ValueError(f"moe.route_group_limit={M} and moe.debug_routing={moe.debug_routing!r} both choose the "
                         f"experts: turn one off")


def _validate_moe(moe: MoEConfig, hidden_size: int, num_layers: int) -> None:
    _choice("moe.gate", moe.gate, ("xmoe", "softmax", "sigmoid"))
    _choice("moe.debug_routing", moe.debug_routing, ("", "balanced", "skew"))
    _choice("moe.balance_counting", moe.balance_counting, ("topk", "first_choice"))
    if moe.ep_ranks_per_node < 0 or moe.ep_recv_budget < 0:
        raise ValueError(f"moe.ep_ranks_per_node={moe.ep_ranks_per_node} (0 = LOCAL_WORLD_SIZE) and "
                         f"moe.ep_recv_budget={moe.ep_recv_budget} (0 = no budget) must be >= 0")
    if moe.a2a_device_counts and moe.capacity_factor <= 0:
        raise ValueError(f"moe.a2a_device_counts=true sizes the receive buffer from the capacity, but "
                         f"capacity_factor={moe.capacity_factor} is dropless: set capacity_factor > 0 (e.g. 1.25), "
                         f"or keep a2a_device_counts=false and bound dropless routing with ep_recv_budget")
    _choice("moe.ep_dispatch", moe.ep_dispatch, ("auto", "flat", "two_level"))
    for name in ("ep_nic_gbps", "ep_node_gbps"):
        if not getattr(moe, name) > 0:
            raise ValueError(f"moe.{name}={getattr(moe, name)} must be > 0 (Gbit/s per direction, for the "
                             f"ep_dispatch='auto' cost model)")
    if moe.ep_tune_forwards < 0:
        raise ValueError(f"moe.ep_tune_forwards={moe.ep_tune_forwards} must be >= 0 (0 = no measured choice)")
    if moe.ep_exchange_us < 0:
        raise ValueError(f"moe.ep_exchange_us={moe.ep_exchange_us} must be >= 0 (microseconds per all-to-all)")
    if moe.a2a_chunks < 1:
        raise ValueError(f"moe.a2a_chunks={moe.a2a_chunks} must be >= 1 (1 = no pipelining)")
    if not 0.0 <= moe.debug_skew_fraction <= 1.0:
        raise ValueError(f"moe.debug_skew_fraction={moe.debug_skew_fraction} must be in [0, 1]")
    if not (math.isfinite(moe.bias_update_rate) and moe.bias_update_rate >= 0):
        raise ValueError(f"moe.bias_update_rate={moe.bias_update_rate} must be a finite number >= 0 (0 = off)")
    _validate_groups(moe)
    if moe.quantile_balancing:
        if moe.bias_update_rate > 0:
            raise ValueError(f"moe.quantile_balancing=true and moe.bias_update_rate={moe.bias_update_rate} both set the "
                             f"routing bias: turn one off (bias_update_rate=0 for quantile balancing)")
        if moe.route_group_limit:
            raise ValueError(f"moe.quantile_balancing=true with moe.route_group_limit={moe.route_group_limit}: the "
                             f"quantile assumes every expert can take every sub-token; set route_group_limit=0")
        if moe.top_k >= moe.num_experts:
            raise ValueError(f"moe.quantile_balancing=true needs top_k < num_experts (the (k+1)-th score is the "
                             f"cutoff); got top_k={moe.top_k}, num_experts={moe.num_experts}")
        if moe.quantile_bins < 2:
            raise ValueError(f"moe.quantile_bins={moe.quantile_bins} must be >= 2")
    if not (math.isfinite(moe.gate_scaling) and moe.gate_scaling > 0):
        raise ValueError(f"moe.gate_scaling={moe.gate_scaling} must be a finite number > 0")
    _choice("moe.expert_activation", moe.expert_activation, ("gelu", "swiglu"))
    if moe.num_experts < 1:
        raise ValueError(f"moe.num_experts={moe.num_experts} must be >= 1")
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ValueError(f"moe.top_k={moe.top_k} must be in [1, num_experts={moe.num_experts}]")
    if moe.num_heads < 1 or hidden_size % moe.num_heads:
        raise ValueError(
            f"moe.num_heads {moe.num_heads} does not divide hidden_size {hidden_size} "
            f"({hidden_size} % {moe.num_heads} = {hidden_size % moe.num_heads if moe.num_heads else 'n/a'}); "
            f"a token of width d splits into h sub-tokens of width d/h")
    if moe.expert_hidden_size < 1 or moe.gate_dim < 1:
        raise ValueError(f"moe.expert_hidden_size={moe.expert_hidden_size} and moe.gate_dim={moe.gate_dim} "
                         f"must be >= 1")
    if moe.num_shared_experts < 0 or moe.shared_expert_hidden_size < 0:
        raise ValueError(f"moe.num_shared_experts={moe.num_shared_experts} and moe.shared_expert_hidden_size="
                         f"{moe.shared_expert_hidden_size} must be >= 0 (0 = no shared experts / "
                         f"expert_hidden_size)")
    if moe.gate_temperature <= 0:
        raise ValueError(f"moe.gate_temperature={moe.gate_temperature} must be > 0")
    if moe.moe_every < 1 or moe.moe_every > num_layers:
        raise ValueError(f"moe.moe_every={moe.moe_every} must be in [1, num_layers={num_layers}] "
                         f"or no layer would be MoE")


# ---------------------------------------------------------------------- dict round trip
def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict) -> ModelConfig:
    """Build a ModelConfig from a plain dict, rejecting unknown keys by name."""
    d = dict(d)
    moe = d.pop("moe", None)
    cfg = ModelConfig(**_known(ModelConfig, d, "model"))
    if moe is not None:
        cfg.moe = MoEConfig(**_known(MoEConfig, moe, "model.moe"))
    return cfg


def _known(cls, d: dict, where: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(names)}")
    check_field_types(cls, d, where)
    return d


def _type_ok(value: Any, typ: Any) -> bool:
    origin = typing.get_origin(typ)
    if typ is Any:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_type_ok(value, t) for t in typing.get_args(typ))
    if typ is type(None):
        return value is None
    if origin in (list, tuple) or typ in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(typ) if a is not Ellipsis]
        return not args or all(_type_ok(v, args[0]) for v in value)
    if origin is dict or typ is dict:
        return isinstance(value, dict)
    if typ is float:  # YAML writes 1 for 1.0; a bool is never a number here
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(typ, type):
        return isinstance(value, typ)
    return True


def check_field_types(cls, d: dict, where: str) -> None:
    """Reject values of the wrong type by name (e.g. `lr: fast`), before they fail deep inside training."""
    hints = typing.get_type_hints(cls)
    for key, value in d.items():
        typ = hints.get(key)
        if typ is None or dataclasses.is_dataclass(typ):
            continue
        if not _type_ok(value, typ):
            union = typing.get_origin(typ) in (typing.Union, types.UnionType)
            want = " or ".join(getattr(t, "__name__", str(t)) for t in typing.get_args(typ)) if union else \
                getattr(typ, "__name__", None) or str(typ).replace("typing.", "")
            raise ValueError(f"{where}.{key} must be {want}, got {type(value).__name__} {value!r}")


