"""transformers model of an exported megatron_mhmoe GPT (copied into the export folder).

Self-contained: plain torch and transformers, no import of megatron_mhmoe, so the folder loads wherever those two
are installed. It re-implements the single-device forward of megatron_mhmoe's GPTModel (model/gpt.py,
attention.py, rope.py, norms.py, mlp.py and the MH-MoE layer of moe/: router.py, capacity.py, experts.py,
shared_experts.py) with the same parameter names, so the exported state dict loads as it is. megatron_mhmoe's
tests/reliability/test_hf_model.py runs both implementations on every model option and compares the logits
(they must not drift apart: a change to the routing maths in megatron_mhmoe/moe/ needs the same change here).

Conventions of transformers decoder models:
- attention_mask (b, past + s), 1 = token, 0 = padding: padded keys are masked out of attention together
  with the causal mask, and positions come from the mask (cumsum - 1), so a left-padded row computes what
  the unpadded prompt computes alone. generate() needs left padding (right padding is refused: new tokens
  would follow the pads).
- the cache is transformers' DynamicCache (beam search reorders it).
- positions beyond max_seq_len (the rule of tools/generate.py): the model never saw a position >= max_seq_len,
  so once prompt + generated tokens exceed it, each new token is predicted from the last max_seq_len tokens
  alone, at positions 0 .. max_seq_len - 1 (the window is recomputed, and cached again, every step).
  forward() refuses more than max_seq_len positions.
- output_hidden_states (embedding output, each block's output; the last one after the final norm),
  return_dict=False (a tuple), inputs_embeds (instead of input_ids; added to the position embeddings).
  output_attentions is refused (attention runs in torch's fused scaled_dot_product_attention).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mhmoe import MHMoEGPTConfig

try:
    from transformers import DynamicCache
except ImportError:  # pragma: no cover - transformers < 4.36
    DynamicCache = None

# transformers 5 renamed the cache field of its outputs and generation kwargs from past_key_values to cache.
_CACHE = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"

NORMALIZE_EPS = 1e-4  # the X-MoE gate's F.normalize eps (megatron_mhmoe/moe/router.py explains the value)
PAD_LEFT = ("generate() needs left padding: set tokenizer.padding_side = 'left' (a right-padded row would "
            "continue after its pad tokens)")


# ---------------------------------------------------------------------------------------------- layers
class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dim, statistics in fp32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float, kind: str):
        super().__init__()
        self.dim, self.eps, self.kind = dim, eps, kind
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            y = F.layer_norm(x.float(), (self.dim,), self.weight.float(), self.bias.float(), self.eps)
        else:
            y = F.rms_norm(x.float(), (self.dim,), self.weight.float(), self.eps)
        return y.to(x.dtype)


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of position * frequency for positions (b, s): each (b, 1, s, hd/2) fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                / head_dim))
    angles = positions.float().unsqueeze(-1) * inv_freq  # (b, s, hd/2)
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hd/2]) ("rotate half", GPT-NeoX / LLaMA). x: (b, nh, s, hd)."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]  # (b, nh, s, hd/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention; the fused QKV output is laid out head-major [heads, 3 (q, k, v), head_dim]."""

    def __init__(self, m: dict):
        super().__init__()
        d = m["hidden_size"]
        self.num_heads = m["num_attention_heads"]
        self.head_dim = d // self.num_heads
        self.use_rope = m.get("position_embedding", "learned") == "rope"
        self.qkv = nn.Linear(d, 3 * d, bias=True)
        self.proj = nn.Linear(d, d, bias=True)

    def forward(self, x: torch.Tensor, rope, mask: Optional[torch.Tensor], cache, layer_idx: int) -> torch.Tensor:
        """x (b, s, d); mask (b, 1, s, past + s) bool (True = may attend) or None = plain causal."""
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.num_heads, 3, self.head_dim)  # (b, s, nh, 3, hd)
        q, k, v = qkv.permute(3, 0, 2, 1, 4)  # (b, nh, s, hd) each
        if self.use_rope:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)  # (b, nh, past + s, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class DenseMLP(nn.Module):
    """gelu: fc2(gelu(fc1 x)); swiglu: down(silu(gate x) * up x), no biases."""

    def __init__(self, m: dict):
        super().__init__()
        d, f = m["hidden_size"], m["ffn_hidden_size"]
        self.activation = m.get("activation", "gelu")
        if self.activation == "gelu":
            self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)
        else:
            self.gate, self.up, self.down = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), \
                nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "gelu":
            return self.fc2(F.gelu(self.fc1(x)))
        return self.down(F.silu(self.gate(x)) * self.up(x))


# ---------------------------------------------------------------------------------------------- MH-MoE
class Router(nn.Module):
    """Sub-token (d/h) -> expert logits (E) in fp32. xmoe: cosine of a gate_dim projection with the expert
    embeddings over a learnt temperature; softmax / sigmoid: a linear map."""

    def __init__(self, d_sub: int, moe: dict):
        super().__init__()
        self.gate, E = moe.get("gate", "xmoe"), moe["num_experts"]
        if self.gate == "xmoe":
            self.proj = nn.Linear(d_sub, moe.get("gate_dim", 16), bias=False)
            self.expert_embeddings = nn.Parameter(torch.zeros(E, moe.get("gate_dim", 16)))
            self.temperature = nn.Parameter(torch.tensor([float(moe.get("gate_temperature", 0.3))]))
        else:
            self.proj = nn.Linear(d_sub, E, bias=False)

    def forward(self, x_sub: torch.Tensor) -> torch.Tensor:  # (S, d/h) -> (S, E)
        if self.gate != "xmoe":
            return F.linear(x_sub.float(), self.proj.weight.float())
        z = F.normalize(F.linear(x_sub.float(), self.proj.weight.float()), dim=-1, eps=NORMALIZE_EPS)
        m = F.normalize(self.expert_embeddings.float(), dim=-1, eps=NORMALIZE_EPS)  # (E, gate_dim)
        return (z @ m.t()) / self.temperature.float().clamp(min=1e-2)


def gate_scores(logits: torch.Tensor, gate: str) -> torch.Tensor:
    """(S, E) what the top-k ranks: sigmoid scores for 'sigmoid', softmax probabilities otherwise."""
    return torch.sigmoid(logits) if gate == "sigmoid" else torch.softmax(logits, dim=-1)


def sigmoid_gate_weights(top: torch.Tensor) -> torch.Tensor:
    """Combine weights of the sigmoid gate from its chosen scores (S, k): normalised over the k when k > 1, the
    raw score at k = 1 (DeepSeek-V3 Eqs. 15-16 as Megatron-core applies them)."""
    return top / top.sum(dim=-1, keepdim=True) if top.shape[1] > 1 else top


def softmax_gate_weights(top: torch.Tensor) -> torch.Tensor:
    """Combine weights of the softmax / xmoe gates from the chosen probabilities (S, k): renormalised when k > 1."""
    return top / top.sum(dim=-1, keepdim=True) if top.shape[1] > 1 else top


def group_scores(select: torch.Tensor, k: int, limit: int) -> torch.Tensor:
    """(S, G, E/G) selection scores by group -> (S, G) a sub-token's score of each group: the sum of its best
    max(1, k // M) scores in the group (DeepSeek-V3 section 2.1.2, "the highest K_r/M"; M = limit)."""
    return select.topk(max(1, k // limit), dim=-1).values.sum(-1)


def group_limit(select: torch.Tensor, groups: int, limit: int, heads: int, k: int) -> torch.Tensor:
    """(S, E) scores of S = n*h token-major sub-tokens -> the experts outside the token's `limit` best groups
    set to -inf. A token scores a group by the sum of its h sub-tokens' group_scores."""
    S, E = select.shape
    per, n = E // groups, S // heads
    token_group = group_scores(select.view(S, groups, per), k, limit).view(n, heads, groups).sum(1)  # (n, G)
    best = token_group.topk(limit, dim=-1).indices  # (n, M)
    allowed = torch.zeros(n, groups, dtype=torch.bool, device=select.device).scatter_(1, best, True)
    allowed = allowed.repeat_interleave(heads, 0).repeat_interleave(per, 1)  # (S, E)
    return select.masked_fill(~allowed, float("-inf"))


def head_affine_outside(S: int, E: int, moe: dict, device=None) -> Optional[torch.Tensor]:
    """(S, E) True where expert e lies outside the group of token-major sub-token i's head (model.moe.head_groups
    G > 1: head j = i mod h routes in group j mod G of E/G contiguous experts); None when off."""
    G = moe.get("head_groups", 0)
    if isinstance(G, str):
        raise ValueError(f"model.moe.head_groups={G!r} was resolved from the training cluster's nodes: set it to "
                         f"the integer G the model trained with (its EP group's node count) before exporting")
    if G <= 1:
        return None
    h = moe.get("num_heads", 1)
    group = (torch.arange(S, device=device) % h) % G  # (S,)
    return group[:, None] != torch.arange(E, device=device)[None, :] // (E // G)


def route(logits: torch.Tensor, moe: dict, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, E) logits -> experts (S, k) best first, gates (S, k): the top-k of the scores (+ the balancing bias,
    within the token's groups when group-limited); the gate weights come from the unbiased scores."""
    gate, k = moe.get("gate", "xmoe"), moe.get("top_k", 2)
    outside = head_affine_outside(logits.shape[0], logits.shape[1], moe, logits.device)
    if outside is not None:  # head-affine: the router over the head's group alone
        logits = logits.masked_fill(outside, float("-inf"))
    scores = gate_scores(logits, gate)  # (S, E)
    select = scores if bias is None else scores + bias.float()
    if outside is not None:
        select = select.masked_fill(outside, float("-inf"))
    if moe.get("route_group_limit", 0):
        select = group_limit(select, moe.get("route_groups", 1), moe["route_group_limit"], moe.get("num_heads", 1), k)
    experts = select.topk(k, dim=-1).indices  # (S, k)
    top = scores.gather(1, experts)  # (S, k)
    gates = sigmoid_gate_weights(top) if gate == "sigmoid" else softmax_gate_weights(top)
    return experts, gates * moe.get("gate_scaling", 1.0)


def capacity_keep(experts: torch.Tensor, num_experts: int, capacity_factor: float) -> Optional[torch.Tensor]:
    """(S, k) -> (S, k) bool, the assignments that fit capacity ceil(cf k S / E) (None: dropless). An expert's
    queue holds all first choices before all second choices, each in sub-token order (GShard's priority)."""
    S, k = experts.shape
    if capacity_factor <= 0:
        return None
    capacity = int(math.ceil(capacity_factor * k * S / num_experts))
    flat = experts.t().reshape(-1)  # (k*S,) choice-major: the queue order
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts  # (E,)
    place = torch.empty_like(flat)
    place[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # place in its queue
    return (place < capacity).view(k, S).t()


class Experts(nn.Module):
    """E expert FFNs (d/h -> hidden -> d/h, no biases), weights stacked along dim 0."""

    def __init__(self, E: int, d_in: int, d_hidden: int, activation: str):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Parameter(torch.zeros(E, d_in, d_hidden))
        self.w2 = nn.Parameter(torch.zeros(E, d_hidden, d_in))
        self.w3 = nn.Parameter(torch.zeros(E, d_in, d_hidden)) if activation == "swiglu" else None

    def ffn(self, x: torch.Tensor, e: int) -> torch.Tensor:
        if self.activation == "swiglu":
            return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]
        return F.gelu(x @ self.w1[e]) @ self.w2[e]

    def forward(self, x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """y[i] = sum_j gates[i, j] FFN_{experts[i, j]}(x[i]); an id < 0 (dropped) adds nothing."""
        y = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            rows, j = (experts == e).nonzero(as_tuple=True)
            if rows.numel():
                y = y.index_add(0, rows, self.ffn(x[rows], e) * gates[rows, j].unsqueeze(1).to(x.dtype))
        return y


class SharedExperts(nn.Module):
    """Always-on experts on every sub-token (gate 1), fused: width num_shared x hidden."""

    def __init__(self, d_in: int, width: int, activation: str):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Parameter(torch.zeros(d_in, width))
        self.w2 = nn.Parameter(torch.zeros(width, d_in))
        self.w3 = nn.Parameter(torch.zeros(d_in, width)) if activation == "swiglu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return (F.silu(x @ self.w1) * (x @ self.w3)) @ self.w2
        return F.gelu(x @ self.w1) @ self.w2


class ExpertBias(nn.Module):
    """Aux-loss-free balancing's per-expert bias (fp32 buffer): shifts which experts are chosen, not the weights."""

    def __init__(self, E: int):
        super().__init__()
        self.register_buffer("value", torch.zeros(E, dtype=torch.float32))


class MHMoE(nn.Module):
    """Head projection, split into h sub-tokens, route (top-k, capacity over the whole forward's sub-tokens),
    routed + shared experts, merge the h sub-tokens, merge projection."""

    def __init__(self, m: dict):
        super().__init__()
        self.moe = moe = m["moe"]
        if moe.get("debug_routing"):
            raise ValueError(f"model.moe.debug_routing={moe['debug_routing']!r} forces the routing for benchmarks: "
                             f"a model trained with it is not exported")
        d, h = m["hidden_size"], moe.get("num_heads", 4)
        self.d_sub = d // h
        E, act = moe["num_experts"], moe.get("expert_activation", "gelu")
        if moe.get("head_projection", True):
            self.head, self.merge = nn.Linear(d, d), nn.Linear(d, d)
        else:
            self.head = self.merge = None
        self.router = Router(self.d_sub, moe)
        hidden = moe.get("expert_hidden_size", 256)
        self.experts = Experts(E, self.d_sub, hidden, act)
        n_shared = moe.get("num_shared_experts", 0)
        self.shared_experts = SharedExperts(self.d_sub, n_shared * (moe.get("shared_expert_hidden_size") or hidden),
                                            act) if n_shared else None
        uses_bias = moe.get("bias_update_rate", 0.0) > 0 or moe.get("quantile_balancing", False)
        self.expert_bias = ExpertBias(E) if uses_bias else None  # the routing bias of either balancing rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        # Sequence-major token order, as megatron_mhmoe's [s, b, d] layout: the capacity queue depends on it.
        tokens = x.transpose(0, 1).reshape(s * b, d)  # (N, d)
        x_hat = self.head(tokens) if self.head is not None else tokens
        x_sub = x_hat.reshape(-1, self.d_sub)  # (N*h, d/h): a token's h sub-tokens are adjacent rows
        experts, gates = route(self.router(x_sub), self.moe,
                               self.expert_bias.value if self.expert_bias is not None else None)
        keep = capacity_keep(experts, self.moe["num_experts"], self.moe.get("capacity_factor", 0.0))
        if keep is not None:
            experts = experts.masked_fill(~keep, -1)
        y_sub = self.experts(x_sub, experts, gates)
        if self.shared_experts is not None:
            y_sub = y_sub + self.shared_experts(x_sub)
        y = y_sub.reshape(s * b, d)
        if self.merge is not None:
            y = self.merge(y)
        return y.view(s, b, d).transpose(0, 1)  # (b, s, d)


# ---------------------------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, m: dict, layer_idx: int):
        super().__init__()
        kind, eps, d = m.get("norm", "layernorm"), m.get("norm_eps", 1e-5), m["hidden_size"]
        self.layer_idx = layer_idx
        self.norm1, self.norm2 = Norm(d, eps, kind), Norm(d, eps, kind)
        self.attn = Attention(m)
        moe = m.get("moe")
        every = moe.get("moe_every", 2) if moe else 0
        self.ffn = MHMoE(m) if moe and layer_idx % every == every - 1 else DenseMLP(m)

    def forward(self, x, rope, mask, cache):
        x = x + self.attn(self.norm1(x), rope, mask, cache, self.layer_idx)
        return x + self.ffn(self.norm2(x))


class Embedding(nn.Module):
    def __init__(self, m: dict, padded_vocab: int):
        super().__init__()
        d = m["hidden_size"]
        self.word_embeddings = nn.Embedding(padded_vocab, d)
        learned = m.get("position_embedding", "learned") == "learned"
        self.position_embeddings = nn.Parameter(torch.zeros(m["max_seq_len"], d)) if learned else None


class GPT(nn.Module):
    """The decoder: embedding (+ learned positions), blocks, final norm, LM head (tied or not)."""

    def __init__(self, m: dict):
        super().__init__()
        self.m = m
        multiple = m.get("make_vocab_divisible_by", 128)
        padded = int(math.ceil(m["vocab_size"] / multiple) * multiple)
        self.embedding = Embedding(m, padded)
        self.layers = nn.ModuleList([Block(m, i) for i in range(m["num_layers"])])
        self.final_norm = Norm(m["hidden_size"], m.get("norm_eps", 1e-5), m.get("norm", "layernorm"))
        self.lm_head = None if m.get("tie_embeddings", True) else nn.Linear(m["hidden_size"], padded, bias=False)


def attention_positions_and_mask(attention_mask: Optional[torch.Tensor], b: int, s: int, past: int,
                                 device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """positions (b, s) of the new tokens and the attention mask (b, 1, s, past + s) bool, or None where
    plain causal attention is exact (no padding, nothing cached: SDPA's is_causal aligns the first query with
    the first key, so it is wrong after a cached prefix).

    1. positions count the real tokens before each one (cumsum of the mask - 1; a pad gets 0);
    2. query i (column past + i) may see the columns <= past + i that are not padding;
    3. and itself, so that a pad query (which sees no real token) stays finite; its output is never read.
    """
    t = past + s
    if attention_mask is None:
        positions = torch.arange(past, t, device=device).unsqueeze(0).expand(b, s)
        if past == 0:  # plain causal attention (is_causal aligns queries and keys at the start)
            return positions, None
        valid = torch.ones(b, t, dtype=torch.bool, device=device)
    else:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask must be 2-D (batch, cached + new positions) = ({b}, {past} + {s}); "
                             f"got shape {tuple(attention_mask.shape)} (4-D masks are not supported)")
        valid = attention_mask.bool()
        # 1.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (b, s)
    # 2.
    col = torch.arange(t, device=device)
    query_col = col[past:].unsqueeze(1)  # (s, 1)
    allowed = (col.unsqueeze(0) <= query_col).unsqueeze(0) & valid.unsqueeze(1)  # (b, s, t)
    # 3.
    allowed |= (col.unsqueeze(0) == query_col).unsqueeze(0)
    return positions, allowed.unsqueeze(1)


class MHMoEGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MHMoEGPTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _supports_cache_class = True

    def __init__(self, config: MHMoEGPTConfig):
        super().__init__(config)
        self.model = GPT(config.mhmoe_model)
        self.post_init()

    def _init_weights(self, module):  # the weights come from the checkpoint
        pass

    def get_input_embeddings(self):
        return self.model.embedding.word_embeddings

    @property
    def max_seq_len(self) -> int:
        return self.config.mhmoe_model["max_seq_len"]

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cache=None, past_key_values=None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                use_cache: Optional[bool] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None, **kwargs):
        if output_attentions:
            raise ValueError("output_attentions=True is not supported: attention runs in torch's fused "
                             "scaled_dot_product_attention, which returns no weights")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        gpt, m = self.model, self.config.mhmoe_model
        cache = cache if cache is not None else past_key_values
        use_cache = bool(use_cache) if use_cache is not None else cache is not None
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        x = gpt.embedding.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (b, s, d)
        b, s = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if past + s > self.max_seq_len:
            raise ValueError(f"{past} cached + {s} new positions = {past + s} > max_seq_len {self.max_seq_len}: "
                             f"the model was trained on at most {self.max_seq_len} positions; pass fewer tokens "
                             f"(generate() predicts each token past max_seq_len from the last max_seq_len tokens)")
        positions, mask = attention_positions_and_mask(attention_mask, b, s, past, x.device)
        if position_ids is not None:
            positions = position_ids.to(x.device).expand(b, s)
        if gpt.embedding.position_embeddings is not None:
            x = x + gpt.embedding.position_embeddings[positions]  # (b, s, d)
        rope = rotary(positions, m["hidden_size"] // m["num_attention_heads"], m.get("rope_theta", 10000.0)) \
            if m.get("position_embedding", "learned") == "rope" else None
        hidden = []
        for layer in gpt.layers:
            hidden.append(x)
            x = layer(x, rope, mask, cache)
        x = gpt.final_norm(x)
        hidden.append(x)
        weight = gpt.embedding.word_embeddings.weight if gpt.lm_head is None else gpt.lm_head.weight
        logits = F.linear(x, weight)[..., :m["vocab_size"]]  # (b, s, V): the padded vocabulary rows dropped
        loss = None
        if labels is not None:
            # transformers' convention: labels are the inputs; position t predicts token t + 1.
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits,
                                     hidden_states=tuple(hidden) if output_hidden_states else None,
                                     **{_CACHE: cache})
        if return_dict is False:
            return out.to_tuple()
        return out

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, **kwargs):
        """The new positions only, with the cache; past max_seq_len the last max_seq_len tokens, uncached."""
        cache = cache if cache is not None else past_key_values
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError(PAD_LEFT)
        past = cache.get_seq_length() if cache is not None and use_cache else 0
        n_embeds = inputs_embeds.shape[1] if inputs_embeds is not None else 0
        total = n_embeds + input_ids.shape[1]
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache}
        if total > self.max_seq_len:
            if n_embeds:
                raise ValueError(f"generate(inputs_embeds=...) cannot go past max_seq_len {self.max_seq_len}: the "
                                 f"window rule recomputes the last max_seq_len tokens from their ids; pass input_ids")
            inputs["input_ids"] = input_ids[:, -self.max_seq_len:]
            if attention_mask is not None:
                inputs["attention_mask"] = attention_mask[:, -self.max_seq_len:]
            inputs[_CACHE] = DynamicCache() if use_cache else None  # a new window: nothing cached applies
            return inputs
        inputs[_CACHE] = cache if use_cache else None
        if n_embeds and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, past - n_embeds:]  # only the positions not cached yet
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, **kwargs):
        cache = getattr(outputs, _CACHE, None)
        if cache is not None:
            model_kwargs[_CACHE] = cache
        else:  # no cache: beam search must find nothing to reorder
            model_kwargs.pop(_CACHE, None)
        n = kwargs.get("num_new_tokens", 1)
        if model_kwargs.get("attention_mask") is not None:
            mask = model_kwargs["attention_mask"]
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], n))], dim=-1)
        return model_kwargs
