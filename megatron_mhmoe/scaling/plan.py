"""The run list of a sweep, and where each run goes: EP size, nodes, experts per rank, memory per rank.

Placement (`place`), for a run with E experts on `nodes_available` nodes of `ranks_per_node` ranks:
  1. target EP = ceil(E / experts_per_rank) (capped by max_ep when set): keep the experts a rank holds
     fixed, grow EP with E;
  2. nodes = ceil(target EP / ranks_per_node), at least 1 and at most nodes_available: a node is filled
     before a second one is taken; world = nodes x ranks_per_node (the rest of a node is data parallel);
  3. EP = the largest divisor of E that also divides world and is <= target EP (EP must divide both:
     each rank holds E/EP experts, and world = EP x EDP);
  4. experts per rank = E / EP (grows beyond experts_per_rank once the machines run out).
Dense runs take one node. Example, experts_per_rank 8, 8 ranks per node, 32 nodes:
  E=8 -> EP 1, 1 node; E=64 -> EP 8, 1 node; E=128 -> EP 16, 2 nodes; E=256 -> EP 32, 4 nodes.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_mhmoe.config import ModelConfig
from megatron_mhmoe.moe import sizing
from megatron_mhmoe.scaling import matching
from megatron_mhmoe.scaling.spec import SweepSpec


@dataclass
class Placement:
    """Where one run goes."""

    nodes: int
    """Nodes the run uses."""
    world: int
    """Ranks = nodes x ranks_per_node."""
    ep: int
    """Expert-parallel size (divides E and world)."""
    experts_per_rank: int
    """E / EP experts held by each rank (0 for dense)."""
    note: str = ""
    """Why EP differs from the target, when it does."""


def place(num_experts: int, nodes_available: int, ranks_per_node: int, experts_per_rank: int,
          max_ep: int = 0) -> Placement:
    """Placement rules of the module docstring. num_experts 0 = dense (one node, EP 1)."""
    for name, v in (("nodes_available", nodes_available), ("ranks_per_node", ranks_per_node),
                    ("experts_per_rank", experts_per_rank)):
        if v < 1:
            raise ValueError(f"{name}={v} must be >= 1")
    if num_experts <= 0:
        return Placement(nodes=1, world=ranks_per_node, ep=1, experts_per_rank=0)
    target = math.ceil(num_experts / experts_per_rank)
    if max_ep:
        target = min(target, max_ep)
    nodes = min(max(1, math.ceil(target / ranks_per_node)), nodes_available)
    world = nodes * ranks_per_node
    ep = max(d for d in range(1, min(target, world) + 1) if num_experts % d == 0 and world % d == 0)
    note = ""
    if ep != target:
        note = (f"target EP ceil({num_experts}/{experts_per_rank}) = {target}; EP {ep} is the largest divisor "
                f"of E={num_experts} and world={nodes}x{ranks_per_node}={world} not above it")
    return Placement(nodes=nodes, world=world, ep=ep, experts_per_rank=num_experts // ep, note=note)


def memory_per_rank(model: ModelConfig, ep: int, world: int, *, precision: str = "bf16", zero_stage: int = 1,
                    micro_batch: int = 1, seq_len: int = 2048, tp: int = 1) -> dict:
    """Rough bytes per rank (an estimate for planning, not a measurement):
      weights+grads: P_local x (2+2 bf16 | 4+4 fp32), P_local = non_expert/TP + expert/EP;
      optimizer:     Adam m, v (+ fp32 master in bf16) = 12 | 8 bytes per param, divided by DP for non-expert
                     and by EDP = world/EP for expert params under ZeRO >= 1;
      activations:   L x s x b x d x 34 bytes (Megatron's per-layer count for 16-bit, x2 for fp32, no
                     recomputation) + the logits s x b x V x 4 (fp32)."""
    p = sizing.count_params(model)
    non_exp, exp = p["non_expert"] / tp, p["expert"] / max(ep, 1)
    wb = 2 if precision in ("bf16", "fp16") else 4
    opt = 12 if precision in ("bf16", "fp16") else 8
    dp, edp = world // tp, world // max(ep, 1)
    shard_ne, shard_e = (dp, edp) if zero_stage >= 1 else (1, 1)
    weights = (non_exp + exp) * 2 * wb
    optimizer = non_exp * opt / shard_ne + exp * opt / shard_e
    act = model.num_layers * seq_len * micro_batch * model.hidden_size * 34 * (wb / 2) / tp \
        + seq_len * micro_batch * model.vocab_size * 4 / tp
    return {"params_local": non_exp + exp, "weights_grads_gb": weights / 2**30,
            "optimizer_gb": optimizer / 2**30, "activations_gb": act / 2**30,
            "total_gb": (weights + optimizer + act) / 2**30}


@dataclass
class RunPlan:
    """One run of the sweep."""

    name: str
    """Unique, stable name: results.jsonl key, run folder, wandb run name."""
    kind: str
    """dense / smoe / finegrained / mhmoe."""
    experts: int
    """The grid's E (the SMoE reference's); 0 for dense."""
    h: int
    """MH-MoE heads (1 otherwise)."""
    mode: str
    """'params' / 'flops' for MH-MoE; '' otherwise."""
    seed: int
    vary: dict
    """Values of the extra axes (dotted key -> value)."""
    model: ModelConfig
    match: dict
    """How the model was sized (sizing report; formulas)."""
    placement: Placement
    tags: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    variant: str = ""
    """Name of the sweep variant (SweepSpec.variants); '' = none."""
    overrides: dict = field(default_factory=dict)
    """The variant's run-config overrides (dotted key -> value), applied before `vary`'s."""
    head_affine: str = ""
    """Head-affine placement of the run (model.moe.head_groups > 1, head_affine_placement); '' = off."""

    @property
    def group_key(self) -> tuple:
        """What seeds are averaged over: everything but the seed."""
        return (self.kind, self.h, self.mode, self.variant, tuple(sorted(self.vary.items())), self.experts)


HEAD_GROUPS_KEY = "model.moe.head_groups"


def head_affine_placement(model: ModelConfig, setting, ep: int, ranks_per_node: int) -> tuple[int, str]:
    """(G, one line saying where each head's experts live) for head_groups `setting` (an int or 'nodes') on
    an EP group of `ep` ranks, `ranks_per_node` per node; (1, '') when off. ValueError with the arithmetic
    when G does not fit the heads, the experts or the nodes (moe/head_affine.py)."""
    from megatron_mhmoe.moe import head_affine, head_groups_check
    from megatron_mhmoe.moe.two_level import node_layout
    moe = model.moe
    if moe is None or setting in (0, 1, None):
        return 1, ""
    layout = node_layout(ep, ranks_per_node) if ranks_per_node > 0 else None
    G = head_affine.resolve(setting, layout)
    if G <= 1:
        return 1, ""
    E, h = moe.num_experts, moe.num_heads
    head_groups_check.check_routing(G, h, E, moe.top_k, where=f"head_groups={setting!r} ->")
    head_affine.check_placement(G, layout, E)
    groups = f"G={G}: head j routes among experts of group j mod {G} ({E // G} each)"
    if layout is None:
        return G, f"{groups}; EP {ep} within one node: routing only, no node to fix"
    N = layout.num_nodes
    return G, (f"{groups}; EP {ep} = {N} nodes x {ranks_per_node}: group g on node g // {G // N}, so each token "
               f"sends h/N = {h // N} sub-tokens to every node, once each whatever k={moe.top_k} (fixed splits)")


def _vary_suffix(vary: dict) -> str:
    parts = []
    for key, value in sorted(vary.items()):
        short = key.split(".")[-1]
        parts.append(f"{short}{value}")
    return ("-" + "-".join(parts)) if parts else ""


def run_name(kind: str, experts: int, h: int, mode: str, seed: int, vary: dict, variant: str = "") -> str:
    """<core>[-<variant>][-<vary key><value>...]-s<seed>; core: dense | smoe-E64 | mhmoe-h4-params-E64
    (| smoe+shared-E64 | mhmoe+shared-h4-params-E64)."""
    if kind == "dense":
        core = "dense"
    elif kind in ("mhmoe", "mhmoe+shared"):
        core = f"{kind}-h{h}-{mode}-E{experts}"
    else:
        core = f"{kind}-E{experts}"
    core += f"-{variant}" if variant else ""
    return f"{core}{_vary_suffix(vary)}-s{seed}".replace("/", "_")


def build_plan(spec: SweepSpec, base: dict, *, nodes: Optional[int] = None,
               ranks_per_node: Optional[int] = None) -> list[RunPlan]:
    """Every run of the grid, in execution order: by E (small first), then kind, h, mode, variant, vary, seed.
    Dense runs (no expert axis) come first; keys under model.moe are not varied for them (neither by vary
    nor by a variant: a variant left without keys runs Dense unnamed, once)."""
    nodes = nodes or spec.nodes
    rpn = ranks_per_node or spec.ranks_per_node
    dense, moe_defaults = matching.dense_reference(base["model"])
    t = base.get("train") or {}
    seq_len = int(t.get("seq_len", 64))
    precision, zero, micro = t.get("precision", "fp32"), int(t.get("zero_stage", 0)), int(t.get("micro_batch_size", 4))
    vary_keys = sorted(spec.vary)
    combos = [dict(zip(vary_keys, vals)) for vals in itertools.product(*(spec.vary[k] for k in vary_keys))]
    variants = list(spec.variants.items()) or [("", {})]
    runs: list[RunPlan] = []
    seen = set()

    def add(kind, E, h, mode, seed, vary, variant="", overrides=None):
        overrides = dict(overrides or {})
        if kind == "dense":
            vary = {k: v for k, v in vary.items() if not k.startswith("model.moe.")}
            overrides = {k: v for k, v in overrides.items() if not k.startswith("model.moe.")}
            variant = variant if overrides else ""
        name = run_name(kind, E, h, mode, seed, vary, variant)
        if name in seen:
            return
        seen.add(name)
        pt = matching.point(kind, dense, E, h=h, mode=mode, top_k=spec.top_k, k_prime=spec.k_prime,
                            moe_every=spec.moe_every, expert_hidden_size=spec.expert_hidden_size, gate=spec.gate,
                            granularity=spec.granularity, hidden_multiple=spec.hidden_multiple,
                            expert_multiple=spec.expert_multiple, moe_defaults=moe_defaults,
                            num_shared_experts=spec.num_shared_experts)
        n_exp = pt.model.moe.num_experts if pt.model.moe else 0
        pl = place(n_exp, nodes, rpn, spec.experts_per_rank, spec.max_ep)
        # Head-affine placement: the sweep's setting on the MH-MoE kinds, a variant's or vary's on any.
        setting = vary.get(HEAD_GROUPS_KEY, overrides.get(HEAD_GROUPS_KEY))
        if setting is None and kind in ("mhmoe", "mhmoe+shared"):
            setting = spec.head_groups
        try:
            G, where = head_affine_placement(pt.model, setting, pl.ep, rpn)
        except ValueError as err:
            raise ValueError(f"run {run_name(kind, E, h, mode, seed, vary, variant)}: {err}") from None
        if G > 1 and kind in ("mhmoe", "mhmoe+shared") and HEAD_GROUPS_KEY not in vary and HEAD_GROUPS_KEY not in overrides:
            pt.model.moe.head_groups = G  # resolved ('nodes' -> the nodes of this run's EP group)
        tags = [spec.name, kind, f"seed{seed}"] + ([f"E{E}"] if kind != "dense" else []) + \
            ([f"h{h}", f"match-{mode}"] if kind in ("mhmoe", "mhmoe+shared") else []) + \
            ([f"variant={variant}"] if variant else []) + \
            [f"{k.split('.')[-1]}={v}" for k, v in sorted(vary.items())]
        mem = memory_per_rank(pt.model, pl.ep, pl.world, precision=precision, zero_stage=zero,
                              micro_batch=micro, seq_len=seq_len)
        runs.append(RunPlan(name=name, kind=kind, experts=E if kind != "dense" else 0, h=h, mode=mode,
                            seed=seed, vary=vary, model=pt.model, match=pt.report, placement=pl, tags=tags,
                            memory=mem, variant=variant, overrides=overrides, head_affine=where))

    if "dense" in spec.kinds:
        for variant, overrides in variants:
            for vary in combos:
                for seed in spec.seeds:
                    add("dense", 0, 1, "", seed, vary, variant, overrides)
    for E in sorted(spec.experts):
        for kind in [k for k in ("smoe", "finegrained", "mhmoe", "smoe+shared", "mhmoe+shared") if k in spec.kinds]:
            hs = spec.heads if kind in ("mhmoe", "mhmoe+shared") else [1]
            modes = spec.modes if kind in ("mhmoe", "mhmoe+shared") else [""]
            for h in hs:
                for mode in modes:
                    for variant, overrides in variants:
                        for vary in combos:
                            for seed in spec.seeds:
                                add(kind, E, h, mode, seed, vary, variant, overrides)
    return runs


def format_plan(runs: list[RunPlan], seq_len: int) -> str:
    """The dry-run table: one line per run."""
    head = (f"{'#':>4} {'run':<40}{'E':>5}{'h':>3}{'k':>3}{'d_exp':>7}{'params M':>10}{'active M':>10}"
            f"{'MFLOP/tok':>10}{'nodes':>6}{'world':>6}{'EP':>5}{'exp/rank':>9}{'mem/rank GB':>12}")
    lines = [head, "-" * len(head)]
    for i, r in enumerate(runs, 1):
        d = matching.describe(r.model, seq_len)
        pl = r.placement
        lines.append(f"{i:>4} {r.name:<40}{d['num_experts']:>5}{d['num_heads']:>3}{d['top_k']:>3}"
                     f"{d['expert_hidden_size']:>7}{d['params_total'] / 1e6:>10.1f}{d['params_active'] / 1e6:>10.1f}"
                     f"{d['flops_per_token'] / 1e6:>10.1f}{pl.nodes:>6}{pl.world:>6}{pl.ep:>5}"
                     f"{pl.experts_per_rank:>9}{r.memory.get('total_gb', 0):>12.2f}")
    notes = sorted({r.placement.note for r in runs if r.placement.note})
    if notes:
        lines.append("placement notes:")
        lines += [f"  {n}" for n in notes]
    affine: dict = {}
    for r in runs:
        if r.head_affine:
            affine.setdefault(r.head_affine, []).append(r.name)
    if affine:
        lines.append("head-affine placement (model.moe.head_groups):")
        for where, names in affine.items():
            lines.append(f"  {names[0]}{f' (+{len(names) - 1} more)' if len(names) > 1 else ''}: {where}")
    return "\n".join(lines)
