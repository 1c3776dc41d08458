"""SweepSpec: what a sweep preset (megatron_mhmoe/presets/*sweep*.yaml) holds.

A sweep preset is YAML with two sections:
  sweep:  the axes and machines (fields of SweepSpec below)
  base:   a run config (the same keys as a train preset) whose `model` is the Dense reference;
          every run starts from it. `base_config: FILE` (relative to the presets folder) is loaded first
          and `base` is merged over it.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets")
KINDS = ("dense", "smoe", "finegrained", "mhmoe", "smoe+shared", "mhmoe+shared")
MODES = ("params", "flops")
VARIANT_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclass
class SweepSpec:
    """One sweep: experts x kind x (h, matching mode) x variants x extra axes x seeds."""

    name: str = "sweep"
    """Sweep name: the wandb group, a tag of every run, and the default output folder name."""
    experts: list = field(default_factory=lambda: [8, 16, 32, 64, 128, 256])
    """E of the SMoE reference per grid point (x axis of the plots). MH-MoE in 'flops' mode gets E' != E."""
    kinds: list = field(default_factory=lambda: ["dense", "smoe", "mhmoe"])
    """Model kinds: 'dense' (one run per seed, no expert axis), 'smoe' (h=1, no projections; X-MoE with the
    xmoe gate), 'finegrained' (SMoE with granularity x more, narrower experts and top-k), 'mhmoe', and
    'smoe+shared' / 'mhmoe+shared': the same with num_shared_experts always-on experts (each of the routed
    experts' shape; MH-MoE sized against the SMoE+shared by the same matching, equal params and FLOPs)."""
    heads: list = field(default_factory=lambda: [4])
    """MH-MoE heads h (each divides hidden_size)."""
    modes: list = field(default_factory=lambda: ["params"])
    """How MH-MoE is sized against the SMoE of the same E: 'params' (arXiv 2404.15045: same E and k,
    experts ~h x wider) and/or 'flops' (arXiv 2411.16205: k'=h, d' and E' solved for equal FLOPs and params)."""
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    """train.seed of each repeat (error bars)."""
    top_k: int = 1
    """SMoE reference top-k (MH-MoE keeps it in 'params' mode; 'flops' mode uses k' = k_prime or h)."""
    k_prime: int = 0
    """'flops' mode: k' of MH-MoE; 0 = h."""
    expert_hidden_size: int = 0
    """SMoE expert width; 0 = the base model's ffn_hidden_size (the dense FFN, 'upcycled' shape)."""
    granularity: int = 2
    """'finegrained': experts split into this many narrower ones, E x g experts of width d_ff/g, top k x g."""
    num_shared_experts: int = 1
    """'smoe+shared' / 'mhmoe+shared': shared experts per MoE layer (moe.num_shared_experts; MH-MoE's act
    on each sub-token, of the matched routed width d'). The other kinds have none."""
    moe_every: int = 2
    """Every moe_every-th layer is MoE (the paper: every other layer)."""
    gate: str = "xmoe"
    """Router of SMoE and MH-MoE ('xmoe' = X-MoE baseline, or 'softmax')."""
    hidden_multiple: int = 8
    """Matched expert widths d' are rounded to this multiple."""
    expert_multiple: int = 8
    """'flops' mode: E' is rounded to this multiple (8 reproduces the published 40 / 96)."""
    vary: dict = field(default_factory=dict)
    """Extra axes: dotted run-config key -> list of values, e.g. {model.moe.aux_loss_coef: [0.0, 0.001]}.
    Keys under model.moe are not varied for dense runs."""
    variants: dict = field(default_factory=dict)
    """Named variants, an axis whose points each set several keys at once: name -> {dotted run-config key:
    value}, e.g. {global: {model.moe.aux_loss_coef: 0.0, model.moe.global_aux_loss_coef: 0.01}}. Every run of
    the grid is made once per variant (crossed with `vary`; a key may not be in both), its name carries the
    variant's name and its record the name and the overrides. Empty = one unnamed variant (no overrides).
    Dense runs drop the model.moe keys; a variant left with none runs Dense once, unnamed."""
    experts_per_rank: int = 8
    """Target experts held by one rank: EP = E / experts_per_rank, grown over nodes (plan.py)."""
    ranks_per_node: int = 1
    """Ranks (GPUs, or CPU processes) per node. A hostfile's slots override it."""
    nodes: int = 1
    """Nodes available. A hostfile's host count overrides it."""
    max_ep: int = 0
    """Cap on EP; 0 = no cap beyond the world size."""
    head_groups: Any = 0
    """Head-affine placement for the MH-MoE kinds (h > 1; docs/head-affine-placement.md): their runs get
    model.moe.head_groups = this, with 'nodes' resolved to the nodes the run's EP group spans (1 = off when
    it fits one node). 0 = off. SMoE, fine-grained and dense runs keep the shared pool (one head). `plan`
    prints each run's placement and refuses a G that does not fit (the arithmetic in the message)."""
    wandb_project: str = "megatron_mhmoe"
    """wandb project of every run and of the summary run."""
    wandb_mode: str = ""
    """'online' / 'offline' / 'disabled'; empty = WANDB_MODE, else the logger's default."""
    reference_ppl: dict = field(default_factory=dict)
    """Published numbers to draw beside the measured ones, {kind: {E: ppl}} (kind 'dense' takes E 0)."""

    # ----------------------------------------------------------------- validation
    def validate(self) -> "SweepSpec":
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"sweep.kinds {self.kinds}: {bad or 'empty'} not in {list(KINDS)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"sweep.modes {self.modes}: {bad or 'empty'} not in {list(MODES)}")
        for name in ("experts", "heads", "seeds"):
            vals = getattr(self, name)
            if not isinstance(vals, list) or not vals or any(not isinstance(v, int) for v in vals):
                raise ValueError(f"sweep.{name}={vals!r} must be a non-empty list of integers")
        if any(e < 1 for e in self.experts) or any(h < 1 for h in self.heads):
            raise ValueError(f"sweep.experts {self.experts} and sweep.heads {self.heads} must be >= 1")
        for name in ("top_k", "granularity", "num_shared_experts", "moe_every", "experts_per_rank",
                     "ranks_per_node", "nodes", "hidden_multiple", "expert_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"sweep.{name}={getattr(self, name)} must be >= 1")
        if self.head_groups != "nodes" and (not isinstance(self.head_groups, int) or isinstance(self.head_groups, bool)
                                            or self.head_groups < 0):
            raise ValueError(f"sweep.head_groups={self.head_groups!r} must be an integer >= 0 (0 = off) or 'nodes'")
        if any(self.top_k > e for e in self.experts):
            raise ValueError(f"sweep.top_k={self.top_k} exceeds the smallest expert count {min(self.experts)}")
        for key, vals in self.vary.items():
            if not isinstance(vals, list) or not vals:
                raise ValueError(f"sweep.vary[{key!r}]={vals!r} must be a non-empty list")
            if key.split(".")[0] not in ("model", "train", "parallel", "data"):
                raise ValueError(f"sweep.vary key {key!r} must start with model./train./parallel./data.")
        if not isinstance(self.variants, dict):
            raise ValueError(f"sweep.variants={self.variants!r} must be a mapping name -> {{dotted key: value}}")
        for vname, over in self.variants.items():
            if not isinstance(vname, str) or not VARIANT_NAME.fullmatch(vname):
                raise ValueError(f"sweep.variants name {vname!r} must be letters, digits, '_', '.', '+' or '-' "
                                 f"(it goes into run names)")
            if not isinstance(over, dict) or not over:
                raise ValueError(f"sweep.variants[{vname!r}]={over!r} must be a non-empty mapping dotted key -> value")
            for key in over:
                if not isinstance(key, str) or key.split(".")[0] not in ("model", "train", "parallel", "data"):
                    raise ValueError(f"sweep.variants[{vname!r}] key {key!r} must start with "
                                     f"model./train./parallel./data.")
                if key in self.vary:
                    raise ValueError(f"sweep.variants[{vname!r}] sets {key!r}, which sweep.vary also varies")
        return self


def resolve_preset(path: str) -> str:
    """A preset name ('cpu_mini_sweep'), file name or path -> an existing file path."""
    candidates = [path, os.path.join(PRESETS_DIR, path), os.path.join(PRESETS_DIR, path + ".yaml")]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise ValueError(f"sweep preset {path!r} not found (tried {candidates})")


def read_preset(path: str) -> dict:
    """The raw preset mapping (before overrides)."""
    from megatron_mhmoe.runtime.run_config import load_config_file
    return load_config_file(resolve_preset(path))


def load_sweep(path: str, overrides: Optional[list] = None) -> tuple[SweepSpec, dict]:
    """(spec, base run-config dict) from a sweep preset file, with `sweep.key=value` / `base.a.b=value`
    overrides applied (values parsed as YAML)."""
    from megatron_mhmoe.runtime.run_config import apply_overrides
    data = read_preset(path)
    apply_overrides(data, list(overrides or []))
    return sweep_from_dict(data, resolve_preset(path))


def sweep_from_dict(data: dict, where: str = "<sweep>") -> tuple[SweepSpec, dict]:
    from megatron_mhmoe.runtime.run_config import _deep_update, load_config_file
    unknown = sorted(set(data) - {"sweep", "base", "base_config"})
    if unknown:
        raise ValueError(f"sweep preset {where}: unknown top-level key(s) {unknown}; known: base, base_config, sweep")
    sweep = dict(data.get("sweep") or {})
    names = {f.name for f in dataclasses.fields(SweepSpec)}
    bad = sorted(set(sweep) - names)
    if bad:
        raise ValueError(f"sweep preset {where}: unknown sweep key(s) {bad}; known: {sorted(names)}")
    spec = SweepSpec(**sweep).validate()
    base: dict[str, Any] = {}
    if data.get("base_config"):  # a run preset, or another sweep preset whose base is taken
        inner_path = resolve_preset(data["base_config"])
        inner = load_config_file(inner_path)
        base = sweep_from_dict(inner, inner_path)[1] if "sweep" in inner or "base" in inner else inner
    _deep_update(base, copy.deepcopy(data.get("base") or {}))
    if not isinstance(base.get("model"), dict):
        raise ValueError(f"sweep preset {where}: base.model (the Dense reference model) is required")
    # base.model.moe, when present, only supplies MoE defaults (aux_loss_coef, capacity_factor, gate
    # temperature, activation_threshold ...); matching.py sets the sizes of every kind.
    return spec, base


def spec_to_dict(spec: SweepSpec) -> dict:
    return dataclasses.asdict(spec)


def replace(spec: SweepSpec, **kw: Optional[Any]) -> SweepSpec:
    return dataclasses.replace(spec, **{k: v for k, v in kw.items() if v is not None}).validate()
