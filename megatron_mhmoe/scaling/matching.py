"""The model of one grid point: Dense, SMoE/X-MoE, fine-grained SMoE, or MH-MoE sized two ways.

All sizes come from megatron_mhmoe.moe.sizing (the arithmetic lives there, with its docstrings):
  'params' (arXiv 2404.15045): MH-MoE keeps E and k; expert width d' solves
      2d^2 + E n (d/h) d' = E n d d_ff        (experts ~h x wider, ~h x expert FLOPs);
  'flops'  (arXiv 2411.16205): k' = h (default), d' and E' solve
      2d^2 + n d d' k' = n d d_ff k   and   E' = (n d d_ff E - 2d^2) / (n (d/h) d').
Published example (d=768, SwiGLU d_ff=2048, top-1, E=8): h=2 -> k'=2 d'=768 E'=40; h=3 -> k'=3 d'=512 E'=96.
'smoe+shared' / 'mhmoe+shared': the same pair with n_s shared experts (always chosen, gate 1, the routed
experts' shape: d -> d_ff -> d for the SMoE, d/h -> d' -> d/h on each sub-token for MH-MoE). They are n_s
more always-chosen experts on both sides, so the same two matchings hold with E + n_s and k + n_s:
  'params': 2d^2 + (E + n_s) n (d/h) d' = (E + n_s) n d d_ff;
  'flops':  2d^2 + n d d' (k' + n_s) = n d d_ff (k + n_s)  and  E' = ((E + n_s) n d d_ff - 2d^2) / (n (d/h) d') - n_s.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import NamedTuple, Optional

from megatron_mhmoe.config import ModelConfig, MoEConfig, model_config_from_dict
from megatron_mhmoe.moe import sizing


class Point(NamedTuple):
    """A matched model and how it was sized."""
    model: ModelConfig
    report: dict


def dense_reference(model_dict: dict) -> tuple[ModelConfig, dict]:
    """(dense ModelConfig, MoE defaults dict) from a base run config's `model` section."""
    d = copy.deepcopy(model_dict)
    moe_defaults = d.pop("moe", None) or {}
    return model_config_from_dict(d).validate(), moe_defaults


def smoe(dense: ModelConfig, num_experts: int, top_k: int, *, moe_every: int = 2, expert_hidden_size: int = 0,
         gate: str = "xmoe", moe_defaults: Optional[dict] = None, num_shared_experts: int = 0) -> ModelConfig:
    """SMoE (X-MoE with gate='xmoe'): h=1, no head/merge projections, experts shaped like the dense FFN
    (width expert_hidden_size or ffn_hidden_size, the dense activation); num_shared_experts shared experts
    of the same shape."""
    base = MoEConfig(**(moe_defaults or {}))
    moe = dataclasses.replace(base, num_experts=num_experts, top_k=top_k, num_heads=1, head_projection=False,
                              expert_hidden_size=expert_hidden_size or dense.ffn_hidden_size,
                              expert_activation=dense.activation, gate=gate, moe_every=moe_every,
                              num_shared_experts=num_shared_experts, shared_expert_hidden_size=0)
    return dataclasses.replace(dense, moe=moe).validate()


def finegrained(reference: ModelConfig, granularity: int) -> ModelConfig:
    """Fine-grained SMoE (DeepSeekMoE-style): each expert split into g narrower ones, k x g of them chosen.
    Same parameters and FLOPs as the reference: (E g) n d (d_ff/g) = E n d d_ff, (k g) n d (d_ff/g) = k n d d_ff."""
    m = reference.moe
    if m.expert_hidden_size % granularity:
        raise ValueError(f"fine-grained split: expert width {m.expert_hidden_size} is not divisible by granularity "
                         f"{granularity} ({m.expert_hidden_size} % {granularity} = "
                         f"{m.expert_hidden_size % granularity})")
    moe = dataclasses.replace(m, num_experts=m.num_experts * granularity, top_k=m.top_k * granularity,
                              expert_hidden_size=m.expert_hidden_size // granularity)
    return dataclasses.replace(reference, moe=moe).validate()


def point(kind: str, dense: ModelConfig, num_experts: int, *, h: int = 1, mode: str = "params", top_k: int = 1,
          k_prime: int = 0, moe_every: int = 2, expert_hidden_size: int = 0, gate: str = "xmoe",
          granularity: int = 2, hidden_multiple: int = 8, expert_multiple: int = 8,
          moe_defaults: Optional[dict] = None, num_shared_experts: int = 1) -> Point:
    """The model for (kind, E, h, mode). `num_experts` is the SMoE reference's E; `num_shared_experts` is
    used by the '+shared' kinds only (the reference of 'mhmoe+shared' is 'smoe+shared')."""
    if kind == "dense":
        return Point(dense, {"mode": "dense"})
    shared = kind.endswith("+shared")
    if shared and num_shared_experts < 1:
        raise ValueError(f"kind {kind!r} needs num_shared_experts >= 1, got {num_shared_experts}")
    ref = smoe(dense, num_experts, top_k, moe_every=moe_every, expert_hidden_size=expert_hidden_size, gate=gate,
               moe_defaults=moe_defaults, num_shared_experts=num_shared_experts if shared else 0)
    if kind in ("smoe", "smoe+shared"):
        return Point(ref, {"mode": "reference"})
    if kind == "finegrained":
        return Point(finegrained(ref, granularity), {"mode": "finegrained", "granularity": granularity})
    if kind not in ("mhmoe", "mhmoe+shared"):
        raise ValueError(f"unknown model kind {kind!r}")
    if mode == "params":
        cfg, rep = sizing.param_matched(ref, h, hidden_multiple=hidden_multiple)
    elif mode == "flops":
        cfg, rep = sizing.flops_and_params_matched(ref, h, k_prime or None, hidden_multiple=hidden_multiple,
                                                   expert_multiple=expert_multiple)
    else:
        raise ValueError(f"unknown matching mode {mode!r}: 'params' or 'flops'")
    return Point(cfg, rep)


def describe(model: ModelConfig, seq_len: int) -> dict:
    """Sizes recorded per run: parameters (total, active per token), forward FLOPs per token, MoE shape."""
    p = sizing.count_params(model)
    m = model.moe
    return {"params_total": int(p["total"]), "params_active": float(p["active_per_token"]),
            "params_expert": int(p["expert"]), "params_non_expert": int(p["non_expert"]),
            "flops_per_token": int(sizing.flops_per_token(model, seq_len)),
            "num_experts": m.num_experts if m else 0, "top_k": m.top_k if m else 0,
            "num_heads": m.num_heads if m else 1, "expert_hidden_size": m.expert_hidden_size if m else 0}
