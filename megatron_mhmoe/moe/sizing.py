"""Parameter and FLOPs counting for GPT models with (MH-)MoE FFNs, and MH-MoE sizing (arXiv 2411.16205).

Everything here is pure arithmetic on a `ModelConfig`: the full single-process model, independent of
TP/EP. Run `python -m megatron_mhmoe.moe.sizing --help` for the comparison table.

Parameter conventions (the layers follow these; a test may compare them with `numel()`):
  d = hidden_size, V = vocab_size (the true vocabulary, NOT the TP-padded one), L = num_layers,
  f = ffn_hidden_size, n = 2 for a GELU FFN, 3 for a SwiGLU FFN.
  1. Embedding V*d; LM head another V*d (no bias) unless tie_embeddings; a learned position table
     max_seq_len*d (none for RoPE).
  2. Norms: LayerNorm 2d (weight + bias), RMSNorm d. Two per block (pre-attention, pre-FFN) + one final.
  3. Attention: fused QKV d x 3d + bias 3d, out proj d x d + bias d  ->  4d^2 + 4d.
  4. Dense FFN: GELU d x f + f, f x d + d (biased); SwiGLU 3*d*f (gate, up, down; bias-free).
  5. MoE layer (h = num_heads, E = num_experts, k = top_k, e = expert_hidden_size, g = gate_dim):
     head + merge projections 2*(d^2 + d) when head_projection;
     router 'xmoe': Linear(d/h -> g, bias=False) + expert embeddings E x g + 1 temperature;
     router 'softmax': Linear(d/h -> E, bias=False);
     experts E * n * (d/h) * e, stacked, no biases (n from moe.expert_activation);
     shared experts n_s * n * (d/h) * e_s (n_s = num_shared_experts, e_s = shared_expert_hidden_size or e:
     the routed experts' shape on each sub-token, see moe/shared_experts.py), no biases.
  6. expert = the stacked (routed) expert weights of all MoE layers; non_expert = total - expert (router,
     head/merge projections and shared experts are non-expert: every token uses them, every EP rank
     holds them).

Active parameters per token (`active_params`, the one definition; GPTModel.num_params uses it too):
  active_per_token = non_expert + shared * (h - 1) + expert * h*k / E
                   = non_expert - shared + (MoE layers) * h * (k*n*(d/h)*e + n_s*n*(d/h)*e_s).
  - Non-expert parameters count in full: the whole input embedding table (V*d, not the one row a token
    looks up), the whole learned position table, and the output layer (an untied LM head V*d; with tied
    embeddings the one shared table, once). This is the usual MoE convention (total minus the experts a
    token does not use): a dense model's active count is its total, and active differs from total only
    by routing.
  - Experts count per routing slot: each of a token's h sub-tokens goes to k experts, and each slot is one
    expert FFN of input width d/h (n*(d/h)*e weights), so a token fills h*k slots per MoE layer. Two
    sub-tokens of one token that pick the same expert count it twice: the figure is the expert weights
    the token's matmuls read, 2 * (its expert part) == the 'experts' FLOPs term exactly, whatever the
    routing, and it exceeds the expert total when h*k > E. The number of DISTINCT experts a token
    touches depends on the routing (between k and min(h*k, E)), so it is not a config quantity.
    Tokens dropped by a finite capacity factor are not accounted for (the figure is the dropless one).
  - Shared experts (`shared`, their weights, part of non_expert) count per slot too: every sub-token
    fills n_s always-chosen slots, so a token reads them h times (h = 1: once, as a non-expert weight).
    2 * (the shared part) == the 'shared_experts' FLOPs term.
  active_per_subtoken = non_expert + expert * k / E (the usual SMoE figure; equal to the above when h = 1).

FLOPs conventions (forward, per token, FLOPs = 2 * multiply-accumulates; bias adds, norms,
activations, softmax, top-k, dispatch and the embedding lookup are not counted):
  attention_proj   L * 2 * 4d^2
  attention_scores L * 2 * 2*s*d   (QK^T and AV over the full seq_len s; not halved for the causal
                                    mask, as in Megatron's and Chinchilla's counts)
  dense_ffn        (dense layers) * 2 * n*d*f
  moe_proj         (MoE layers) * 2 * 2d^2             (head + merge, when head_projection)
  router           (MoE layers) * 2 * h * ((d/h)*g + E*g)   xmoe (projection + scores vs E embeddings)
                   (MoE layers) * 2 * h * (d/h)*E            softmax
  experts          (MoE layers) * 2 * h * k * n * (d/h) * e  = 2 * k*n*d*e
  shared_experts   (MoE layers) * 2 * h * n_s * n * (d/h) * e_s = 2 * n_s*n*d*e_s  (one more top-k choice each)
  lm_head          2 * V*d
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Dict, List, NamedTuple, Optional, Sequence

from megatron_mhmoe.config import ModelConfig, MoEConfig

N_MATRICES = {"gelu": 2, "swiglu": 3}


# ============================================================================ parameters
def norm_params(cfg: ModelConfig) -> int:
    return 2 * cfg.hidden_size if cfg.norm == "layernorm" else cfg.hidden_size


def attention_params(cfg: ModelConfig) -> int:
    d = cfg.hidden_size
    return (3 * d * d + 3 * d) + (d * d + d)


def dense_ffn_params(cfg: ModelConfig) -> int:
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    if cfg.activation == "gelu":
        return d * f + f + f * d + d
    return 3 * d * f


def moe_layer_params(cfg: ModelConfig) -> Dict[str, int]:
    """One MoE layer: {'projection', 'router', 'experts', 'shared', 'total'}."""
    m, d = _moe(cfg), cfg.hidden_size
    d_sub = _sub_width(d, m.num_heads)
    proj = 2 * (d * d + d) if m.head_projection else 0
    if m.gate == "xmoe":
        router = d_sub * m.gate_dim + m.num_experts * m.gate_dim + 1
    else:
        router = d_sub * m.num_experts
    experts = m.num_experts * N_MATRICES[m.expert_activation] * d_sub * m.expert_hidden_size
    shared = _shared_per_subtoken(m, d_sub)
    return {"projection": proj, "router": router, "experts": experts, "shared": shared,
            "total": proj + router + experts + shared}


def _shared_per_subtoken(m: MoEConfig, d_sub: int) -> int:
    """Shared-expert weights of one layer = their MACs per sub-token: n_s * n * (d/h) * e_s."""
    return m.num_shared_experts * N_MATRICES[m.expert_activation] * d_sub * \
        (m.shared_expert_hidden_size or m.expert_hidden_size)


def count_params(cfg: ModelConfig) -> Dict[str, float]:
    """Parameter counts of the whole model (see the module docstring for every convention)."""
    d, V = cfg.hidden_size, cfg.vocab_size
    n_moe = num_moe_layers(cfg)
    n_dense = cfg.num_layers - n_moe
    embedding = V * d + (0 if cfg.tie_embeddings else V * d)
    position = cfg.max_seq_len * d if cfg.position_embedding == "learned" else 0
    attention = cfg.num_layers * attention_params(cfg)
    norms = (2 * cfg.num_layers + 1) * norm_params(cfg)
    dense_ffn = n_dense * dense_ffn_params(cfg)
    moe = moe_layer_params(cfg) if n_moe else {"projection": 0, "router": 0, "experts": 0, "shared": 0,
                                               "total": 0}
    expert, shared = n_moe * moe["experts"], n_moe * moe["shared"]
    total = embedding + position + attention + norms + dense_ffn + n_moe * moe["total"]
    non_expert = total - expert
    per_sub = cfg.moe.top_k / cfg.moe.num_experts if n_moe else 0.0
    return {
        "total": total, "expert": expert, "non_expert": non_expert,
        "active_per_token": active_params(cfg.moe, non_expert, expert, shared),
        "active_per_subtoken": non_expert + expert * per_sub,
        "embedding": embedding, "position": position, "attention": attention, "norms": norms,
        "dense_ffn": dense_ffn, "moe_projection": n_moe * moe["projection"],
        "router": n_moe * moe["router"], "shared_expert": shared,
    }


def active_params(moe: Optional[MoEConfig], non_expert: int, expert: int, shared: int = 0) -> int:
    """Active parameters per token (module docstring) from the non-expert and expert totals.

    `shared`: the shared-expert weights (included in non_expert), read by each of a token's h sub-tokens.

    Takes the two totals rather than a whole config so that the live model (GPTModel.num_params, which
    counts its own tensors) and `count_params` (which counts the config) apply the same definition.
    `expert` is E equal stacks of experts, so expert * h*k / E is a whole number.
    """
    if moe is None or expert == 0:
        return non_expert
    return non_expert + shared * (moe.num_heads - 1) + expert * moe.num_heads * moe.top_k // moe.num_experts


def active_params_per_token(cfg: ModelConfig) -> int:
    """Active parameters per token of the model `cfg` describes (module docstring)."""
    return count_params(cfg)["active_per_token"]


# ============================================================================ FLOPs
def moe_layer_macs(cfg: ModelConfig) -> Dict[str, int]:
    """Multiply-accumulates per token of one MoE layer: {'projection', 'router', 'experts', 'shared', 'total'}."""
    m, d = _moe(cfg), cfg.hidden_size
    h = m.num_heads
    d_sub = _sub_width(d, h)
    proj = 2 * d * d if m.head_projection else 0
    if m.gate == "xmoe":
        router = h * (d_sub * m.gate_dim + m.num_experts * m.gate_dim)
    else:
        router = h * d_sub * m.num_experts
    experts = h * m.top_k * N_MATRICES[m.expert_activation] * d_sub * m.expert_hidden_size
    shared = h * _shared_per_subtoken(m, d_sub)
    return {"projection": proj, "router": router, "experts": experts, "shared": shared,
            "total": proj + router + experts + shared}


def flops_breakdown(cfg: ModelConfig, seq_len: int) -> Dict[str, int]:
    """Forward FLOPs per token by term (module docstring), plus 'total'."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    d, L = cfg.hidden_size, cfg.num_layers
    n_moe = num_moe_layers(cfg)
    n = N_MATRICES[cfg.activation]
    moe = moe_layer_macs(cfg) if n_moe else {"projection": 0, "router": 0, "experts": 0, "shared": 0}
    out = {
        "attention_proj": 2 * L * 4 * d * d,
        "attention_scores": 2 * L * 2 * seq_len * d,
        "dense_ffn": 2 * (L - n_moe) * n * d * cfg.ffn_hidden_size,
        "moe_proj": 2 * n_moe * moe["projection"],
        "router": 2 * n_moe * moe["router"],
        "experts": 2 * n_moe * moe["experts"],
        "shared_experts": 2 * n_moe * moe["shared"],
        "lm_head": 2 * cfg.vocab_size * d,
    }
    out["total"] = sum(out.values())
    return out


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token (training step ~ 3x this, without activation recomputation)."""
    return flops_breakdown(cfg, seq_len)["total"]


# ============================================================================ building configs
def num_moe_layers(cfg: ModelConfig) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))


def smoe_from_dense(cfg: ModelConfig, num_experts: int, top_k: int, *, moe_every: int = 2,
                    expert_hidden_size: Optional[int] = None, gate: str = "xmoe",
                    gate_dim: int = 16) -> ModelConfig:
    """The SMoE (X-MoE when gate='xmoe') baseline: every moe_every-th FFN becomes E experts of width
    expert_hidden_size (default ffn_hidden_size) and the dense FFN's activation; h=1, no projections."""
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, num_heads=1, head_projection=False,
                    expert_hidden_size=expert_hidden_size or cfg.ffn_hidden_size,
                    expert_activation=cfg.activation, gate=gate, gate_dim=gate_dim, moe_every=moe_every)
    return dataclasses.replace(cfg, moe=moe).validate()


class Matched(NamedTuple):
    config: ModelConfig
    report: dict


def param_matched(cfg: ModelConfig, h: int, *, hidden_multiple: int = 8) -> Matched:
    """The first paper's (arXiv 2404.15045) matching: parameters only.

    MH-MoE with h heads (projections on), the reference's E and k, and expert width d' such that the
    layer's weights (head + merge projections included) equal the reference's:
      1. reference: P_ref = [2d^2 if it has projections] + E * n * (d/h_ref) * d_ff
         (SMoE: E * n * d * d_ff);
      2. MH-MoE:    P     = 2d^2 + E * n * (d/h) * d';
      3. P = P_ref  ->  d' = (P_ref - 2d^2) / (E * n * d/h), rounded to the nearest multiple of
         hidden_multiple (default 8; at least one multiple).
    Biases and the router are left out of the equation (they are < 0.1% of a layer) but counted in the
    report. Expert FLOPs grow ~h-fold: each of the h sub-tokens runs k experts ~h times wider.
    With n_s shared experts (moe.num_shared_experts, kept) P_ref includes the reference's and the MH-MoE's
    are of the routed shape (width d'): P = 2d^2 + (E + n_s) n (d/h) d', so d' = (P_ref - 2d^2) /
    ((E + n_s) n d/h).
    A dense `cfg` is taken as an SMoE with one expert, top-1, on every layer.
    """
    ref = _reference(cfg)
    m = ref.moe
    d, n = ref.hidden_size, N_MATRICES[m.expert_activation]
    d_sub = _sub_width(d, h)
    p_ref = _formula_params(ref)
    n_s = m.num_shared_experts
    d_exact = (p_ref - 2 * d * d) / ((m.num_experts + n_s) * n * d_sub)
    if d_exact <= 0:
        raise ValueError(
            f"no positive expert width: d' = (P_ref - 2d^2) / (E n d/h) = ({p_ref} - 2*{d}^2) / "
            f"({m.num_experts}*{n}*{d_sub}) = {d_exact:.3f}; the head and merge projections alone "
            f"outweigh the reference's experts")
    d_prime = _round_to(d_exact, hidden_multiple)
    new = _mhmoe(ref, h=h, top_k=m.top_k, num_experts=m.num_experts, expert_hidden_size=d_prime,
                 shared_expert_hidden_size=0)
    e_term = f"({m.num_experts}+{n_s})" if n_s else f"{m.num_experts}"
    report = {"mode": "params", "h": h, "k_prime": m.top_k, "d_prime": d_prime, "E_prime": m.num_experts,
              "d_prime_exact": d_exact, "E_prime_exact": float(m.num_experts), "num_shared_experts": n_s,
              "formula": f"d' = (P_ref - 2d^2)/({'(E+n_s)' if n_s else 'E'} n d/h) = ({p_ref} - {2 * d * d})/"
                         f"({e_term}*{n}*{d_sub}) = {d_exact:.2f} -> {d_prime}"}
    report.update(_compare(ref, new))
    return Matched(new, report)


def flops_and_params_matched(cfg: ModelConfig, h: int, k_prime: Optional[int] = None, *,
                             hidden_multiple: int = 8, expert_multiple: int = 8) -> Matched:
    """The follow-up's (arXiv 2411.16205) matching: FLOPs and parameters.

      1. Per-token MACs of the reference's MoE weights: M_ref = [2d^2 if projections] + k * n * d * d_ff
         (h_ref sub-tokens * k experts * n * (d/h_ref) * d_ff).
      2. MH-MoE: h sub-tokens of width d/h, each through k' experts of width d':
         2d^2 + h * k' * n * (d/h) * d' = 2d^2 + n * d * d' * k'.
      3. FLOPs match: d' = (M_ref - 2d^2) / (n d k'), k' defaults to h; d' rounded to the nearest
         multiple of hidden_multiple (default 8).
      4. Params match: E' = (P_ref - 2d^2) / (n (d/h) d'), P_ref = [2d^2] + E n (d/h_ref) d_ff
         (SMoE: E' = (n d d_ff E - 2d^2) / (n (d/h) d')).
      5. E' rounded to the nearest multiple of expert_multiple (default 8, at least one multiple), so
         that every power-of-two EP size up to 8 divides it. This reproduces the published sizes:
         d=768, SwiGLU d_ff=2048, E=8, k=1:
           h=2: d'k' = 2048 - 2*768/3 = 1536 -> k'=2, d'=768; E' = 36569088/884736 = 41.33 -> 40;
           h=3: k'=3, d'=512;                              E' = 36569088/393216 = 93.00 -> 96.
         Both roundings are off by exactly 2d^2 (one layer's projections) in MoE-layer parameters
         (-3.1% / +3.1%); pass expert_multiple=1 for the closest match.
    With n_s shared experts (moe.num_shared_experts, kept; the MH-MoE's of the routed shape, width d')
    they are n_s more always-chosen experts on both sides: M_ref and P_ref include the reference's,
    d' = (M_ref - 2d^2) / (n d (k' + n_s)) and E' = (P_ref - 2d^2) / (n (d/h) d') - n_s.
    A dense `cfg` is taken as an SMoE with one expert, top-1, on every layer (then E' = h k').
    """
    ref = _reference(cfg)
    m = ref.moe
    d, n = ref.hidden_size, N_MATRICES[m.expert_activation]
    d_sub = _sub_width(d, h)
    k_prime = h if k_prime is None else k_prime
    if k_prime < 1:
        raise ValueError(f"k_prime={k_prime} must be >= 1")
    n_s = m.num_shared_experts
    m_ref = (2 * d * d if m.head_projection else 0) + m.top_k * n * d * m.expert_hidden_size + \
        moe_layer_macs(ref)["shared"]
    d_exact = (m_ref - 2 * d * d) / (n * d * (k_prime + n_s))
    if d_exact <= 0:
        raise ValueError(
            f"no positive expert width: d' = (M_ref - 2d^2) / (n d k') = ({m_ref} - 2*{d}^2) / "
            f"({n}*{d}*{k_prime}) = {d_exact:.3f}; the projections alone cost more than the reference's "
            f"experts per token")
    d_prime = _round_to(d_exact, hidden_multiple)
    p_ref = _formula_params(ref)
    e_exact = (p_ref - 2 * d * d) / (n * d_sub * d_prime) - n_s
    if e_exact <= 0:
        raise ValueError(f"no positive expert count: E' = (P_ref - 2d^2) / (n d/h d') = ({p_ref} - "
                         f"2*{d}^2) / ({n}*{d_sub}*{d_prime}) = {e_exact:.3f}")
    e_prime = _round_to(e_exact, expert_multiple)
    if e_prime < k_prime:
        raise ValueError(f"E' = {e_prime} (exact {e_exact:.2f}) is smaller than k' = {k_prime}: "
                         f"each sub-token cannot pick {k_prime} distinct experts; lower k'")
    new = _mhmoe(ref, h=h, top_k=k_prime, num_experts=e_prime, expert_hidden_size=d_prime,
                 shared_expert_hidden_size=0)
    if n_s:
        formula = (f"d' = (M_ref - 2d^2)/(n d (k'+n_s)) = ({m_ref} - {2 * d * d})/({n}*{d}*({k_prime}+{n_s})) = "
                   f"{d_exact:.2f} -> {d_prime}; E' = (P_ref - 2d^2)/(n d/h d') - n_s = ({p_ref} - "
                   f"{2 * d * d})/({n}*{d_sub}*{d_prime}) - {n_s} = {e_exact:.2f} -> {e_prime}")
    else:
        formula = (f"d' = (M_ref - 2d^2)/(n d k') = ({m_ref} - {2 * d * d})/({n}*{d}*{k_prime}) = "
                   f"{d_exact:.2f} -> {d_prime}; E' = (P_ref - 2d^2)/(n d/h d') = ({p_ref} - "
                   f"{2 * d * d})/({n}*{d_sub}*{d_prime}) = {e_exact:.2f} -> {e_prime}")
    report = {"mode": "flops", "h": h, "k_prime": k_prime, "d_prime": d_prime, "E_prime": e_prime,
              "d_prime_exact": d_exact, "E_prime_exact": e_exact, "num_shared_experts": n_s, "formula": formula}
    report.update(_compare(ref, new))
    return Matched(new, report)


# ---------------------------------------------------------------------------- helpers
def _moe(cfg: ModelConfig) -> MoEConfig:
    if cfg.moe is None:
        raise ValueError("this count needs an MoE config (cfg.moe is None)")
    return cfg.moe


def _sub_width(d: int, h: int) -> int:
    if h < 1 or d % h:
        raise ValueError(f"heads h={h} must divide hidden_size d={d} "
                         f"({d} % {h} = {d % h if h >= 1 else 'n/a'}); sub-tokens have width d/h")
    return d // h


def _round_to(x: float, multiple: int) -> int:
    if multiple < 1:
        raise ValueError(f"rounding multiple {multiple} must be >= 1")
    return max(multiple, multiple * math.floor(x / multiple + 0.5))


def _reference(cfg: ModelConfig) -> ModelConfig:
    cfg.validate()
    if cfg.moe is None:
        return smoe_from_dense(cfg, num_experts=1, top_k=1, moe_every=1)
    return cfg


def _formula_params(ref: ModelConfig) -> int:
    """The MoE-layer weights the matching equations count: 2d^2 (if projections) + expert weights (routed
    and shared)."""
    m, d = ref.moe, ref.hidden_size
    lp = moe_layer_params(ref)
    return (2 * d * d if m.head_projection else 0) + lp["experts"] + lp["shared"]


def _mhmoe(ref: ModelConfig, **moe_fields) -> ModelConfig:
    moe = dataclasses.replace(ref.moe, num_heads=moe_fields.pop("h"), head_projection=True, **moe_fields)
    return dataclasses.replace(ref, moe=moe).validate()


def _compare(ref: ModelConfig, new: ModelConfig) -> dict:
    """Ratios new/ref of full counts (biases and router included)."""
    lp_ref, lp_new = moe_layer_params(ref)["total"], moe_layer_params(new)["total"]
    lm_ref, lm_new = moe_layer_macs(ref)["total"], moe_layer_macs(new)["total"]
    return {"layer_params_ref": lp_ref, "layer_params": lp_new, "layer_param_ratio": lp_new / lp_ref,
            "layer_macs_ref": lm_ref, "layer_macs": lm_new, "layer_flops_ratio": lm_new / lm_ref,
            "model_param_ratio": count_params(new)["total"] / count_params(ref)["total"]}


# ============================================================================ CLI
def _table(rows: List[dict], seq_len: int, base: dict) -> str:
    head = (f"{'variant':<24}{'h':>3}{'k':>4}{'d_exp':>7}{'E':>6}{'total M':>10}{'active M':>10}"
            f"{'expert M':>10}{'non-exp M':>11}{'GFLOPs/tok':>12}{'params/ref':>12}{'FLOPs/ref':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        cfg = r["config"]
        p, fl = count_params(cfg), flops_per_token(cfg, seq_len)
        m = cfg.moe
        h, k, e, E = (m.num_heads, m.top_k, m.expert_hidden_size, m.num_experts) if m else \
            (1, 1, cfg.ffn_hidden_size, 1)
        lines.append(f"{r['name']:<24}{h:>3}{k:>4}{e:>7}{E:>6}{p['total'] / 1e6:>10.1f}"
                     f"{p['active_per_token'] / 1e6:>10.1f}{p['expert'] / 1e6:>10.1f}"
                     f"{p['non_expert'] / 1e6:>11.1f}{fl / 1e9:>12.3f}"
                     f"{p['total'] / base['params']:>12.3f}{fl / base['flops']:>11.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m megatron_mhmoe.moe.sizing",
        description="Parameters and FLOPs of Dense / SMoE / MH-MoE variants, with MH-MoE sized to match the "
                    "SMoE in parameters ('params', arXiv 2404.15045) or in FLOPs and parameters ('flops', "
                    "arXiv 2411.16205). Defaults: the follow-up paper's d=768 SwiGLU family.")
    ap.add_argument("--hidden-size", type=int, default=768)
    ap.add_argument("--num-layers", type=int, default=12)
    ap.add_argument("--num-attention-heads", type=int, default=None, help="default hidden_size/64")
    ap.add_argument("--vocab-size", type=int, default=50257)
    ap.add_argument("--ffn-hidden-size", type=int, default=2048, help="dense FFN width d_ff")
    ap.add_argument("--activation", choices=("gelu", "swiglu"), default="swiglu")
    ap.add_argument("--norm", choices=("layernorm", "rmsnorm"), default="layernorm")
    ap.add_argument("--position-embedding", choices=("learned", "rope"), default="learned")
    ap.add_argument("--untied", action="store_true", help="separate LM head")
    ap.add_argument("--num-experts", type=int, default=8, help="SMoE experts E")
    ap.add_argument("--top-k", type=int, default=1, help="SMoE top-k")
    ap.add_argument("--expert-hidden-size", type=int, default=None, help="SMoE expert width (default d_ff)")
    ap.add_argument("--moe-every", type=int, default=2)
    ap.add_argument("--gate", choices=("xmoe", "softmax", "sigmoid"), default="xmoe")
    ap.add_argument("--gate-dim", type=int, default=16)
    ap.add_argument("--num-shared-experts", type=int, default=0,
                    help="shared experts per MoE layer, of the routed experts' shape (MH-MoE: on each sub-token)")
    ap.add_argument("--heads", type=int, nargs="+", default=[2, 3], help="MH-MoE heads h to size")
    ap.add_argument("--k-prime", type=int, default=None, help="flops mode: k' for every h (default h)")
    ap.add_argument("--mode", choices=("flops", "params", "both"), default="both")
    ap.add_argument("--seq-len", type=int, default=2048, help="for attention FLOPs and the position table")
    ap.add_argument("--hidden-multiple", type=int, default=8, help="round d' to this multiple")
    ap.add_argument("--expert-multiple", type=int, default=8, help="round E' to this multiple")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    dense = ModelConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_layers=a.num_layers,
                        num_attention_heads=a.num_attention_heads or max(1, a.hidden_size // 64),
                        ffn_hidden_size=a.ffn_hidden_size, max_seq_len=a.seq_len, activation=a.activation,
                        norm=a.norm, position_embedding=a.position_embedding,
                        tie_embeddings=not a.untied).validate()
    smoe = smoe_from_dense(dense, a.num_experts, a.top_k, moe_every=a.moe_every,
                           expert_hidden_size=a.expert_hidden_size, gate=a.gate, gate_dim=a.gate_dim)
    if a.num_shared_experts:
        smoe = dataclasses.replace(smoe, moe=dataclasses.replace(smoe.moe, num_shared_experts=a.num_shared_experts))
        smoe.validate()
    rows = [{"name": "Dense", "config": dense}, {"name": "SMoE" if a.gate == "softmax" else "SMoE (X-MoE)",
                                                 "config": smoe}]
    notes = []
    modes = ("params", "flops") if a.mode == "both" else (a.mode,)
    for mode in modes:
        for h in a.heads:
            if mode == "params":
                cfg, rep = param_matched(smoe, h, hidden_multiple=a.hidden_multiple)
            else:
                cfg, rep = flops_and_params_matched(smoe, h, a.k_prime, hidden_multiple=a.hidden_multiple,
                                                    expert_multiple=a.expert_multiple)
            rows.append({"name": f"MH-MoE h={h} [{mode}]", "config": cfg})
            notes.append(f"  MH-MoE h={h} [{mode}]: k'={rep['k_prime']} d'={rep['d_prime']} E'={rep['E_prime']}"
                         f"  (MoE layer params x{rep['layer_param_ratio']:.3f}, FLOPs "
                         f"x{rep['layer_flops_ratio']:.3f} vs SMoE)\n    {rep['formula']}")
    base = {"params": count_params(smoe)["total"], "flops": flops_per_token(smoe, a.seq_len)}
    print(f"d={a.hidden_size} L={a.num_layers} V={a.vocab_size} d_ff={a.ffn_hidden_size} {a.activation} "
          f"E={a.num_experts} k={a.top_k}{f' + {a.num_shared_experts} shared' if a.num_shared_experts else ''} "
          f"MoE every {a.moe_every} layer(s), seq_len={a.seq_len}; "
          f"ratios vs the SMoE; active = non-expert params + the h*k expert slots of a token")
    print(_table(rows, a.seq_len, base))
    print("matched sizes:")
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
