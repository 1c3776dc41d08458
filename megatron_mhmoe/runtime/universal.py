"""Universal optimizer state: per parameter, independent of the ZeRO stage and of DP size.

Every checkpoint rank file carries, next to DeepSpeed's native optimizer partition, a `universal` entry:
    meta:   name -> how the parameter is laid out (tp_dim, vocab, expert/ep_dim, tp_partial, local shape)
    params: name -> {fp32, exp_avg, exp_avg_sq, step} for this rank's TP/EP-local parameter (not ZeRO-split)
    coords: this rank's tp/ep/dp/edp ranks and sizes
Only one replica stores each parameter: dense parameter i on the DP rank i % DP, expert parameter j on the
EDP rank j % EDP, so the universal copy costs one model's optimizer state in total, not DP of them.

`collect` (save) and `restore` (load) are collective. They read/write fp32 master weights and Adam
moments through DeepSpeed's fragment mapping for ZeRO-1/2 and bf16 (`safe_set_full_*`), through the
fp32 copies of FP16_UnfusedOptimizer, or straight from torch's AdamW state at ZeRO-0 fp32.
tools/reshard_checkpoint.py gathers these into full tensors and re-shards them for another layout;
train.py restores from them when a checkpoint has no native optimizer partition.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.params import is_expert

FORMAT = 1
STATE_KEYS = ("exp_avg", "exp_avg_sq")


# ---------------------------------------------------------------------- metadata
def param_meta(module: torch.nn.Module) -> dict:
    """name -> layout facts the offline tools need to gather and re-shard without a model."""
    out = {}
    for name, p in module.named_parameters():
        out[name] = {"tp_dim": getattr(p, "tp_dim", None), "vocab": getattr(p, "vocab_dim", None) is not None,
                     "expert": is_expert(p), "ep_dim": getattr(p, "ep_dim", None) if is_expert(p) else None,
                     "tp_partial": bool(getattr(p, "tp_partial_grad", False)), "local_shape": list(p.shape)}
    return out


def owner_index(names: list[str], meta: dict, dp_size: int, edp_size: int) -> dict:
    """name -> the DP rank (dense) or EDP rank (expert) that stores its universal state."""
    dense = [n for n in names if not meta[n]["expert"]]
    expert = [n for n in names if meta[n]["expert"]]
    out = {n: i % dp_size for i, n in enumerate(dense)}
    out.update({n: i % edp_size for i, n in enumerate(expert)})
    return out


def coords(ctx: ParallelContext) -> dict:
    return {"tp_rank": ctx.tp_rank, "tp_size": ctx.tp_size, "ep_rank": ctx.ep_rank, "ep_size": ctx.ep_size,
            "dp_rank": ctx.dp_rank, "dp_size": ctx.dp_size, "edp_rank": ctx.edp_rank, "edp_size": ctx.edp_size,
            "rank": ctx.rank, "world_size": ctx.world_size}


# ---------------------------------------------------------------------- optimizer access
def _kind(opt) -> Optional[str]:
    """'hp' (DeepSpeed fragment mapping: ZeRO-1/2, BF16_Optimizer), 'unfused' (fp32 copies), 'torch', None."""
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        return "hp"
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups") and hasattr(opt, "optimizer"):
        return "unfused"
    if isinstance(opt, torch.optim.Optimizer):
        return "torch"
    return None


def supported(engine) -> Optional[str]:
    """None if universal state can be read from this engine's optimizer, else why not."""
    if _kind(engine.optimizer) is None:
        return f"optimizer {type(engine.optimizer).__name__} has no known per-parameter state layout"
    return None


def _base(opt):
    return opt.optimizer if _kind(opt) in ("hp", "unfused") else opt


def _hp_flats(opt) -> list:
    flats = getattr(opt, "single_partition_of_fp32_groups", None)
    if flats is None:
        flats = getattr(opt, "fp32_groups_flat_partition")
    return list(flats)


def _relink(opt) -> None:
    """DeepSpeed 0.19.8 links fragment views of the Adam state after the FIRST group's step only, so the
    other groups' fragments stay empty (safe_get_full_optimizer_state raises): link them all again."""
    opt._hp_optimizer_states_linked = False
    opt._lazy_init_hp_params_optimizer_state()


def _full_hp(p, key: Optional[str]) -> torch.Tensor:
    """The fp32 master (key None) or an Adam moment of `p`, assembled over its ZeRO group (collective).
    Like DeepSpeed's get_full_hp_param, but a moment not created yet (no step taken) reads as zeros."""
    buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    mapping = p._hp_mapping
    if mapping is not None:
        src = mapping.hp_fragment if key is None else (mapping.optim_fragment or {}).get(key)
        if src is not None:
            addr = mapping.lp_fragment_address
            buf.narrow(0, addr.start, addr.numel).copy_(src.detach().float())
    dist.all_reduce(buf, group=p._dp_group)
    return buf.view(p.shape)


def _step_of(state: dict) -> float:
    s = state.get("step", 0.0)
    return float(s.item() if torch.is_tensor(s) else s)


def _local_entries(engine, module) -> dict:
    """name -> {fp32, exp_avg, exp_avg_sq, step} for every local parameter (collective for 'hp')."""
    opt = engine.optimizer
    kind = _kind(opt)
    params = list(module.named_parameters())
    out = {}
    if kind == "hp":
        _relink(opt)
        base = opt.optimizer
        step = max([_step_of(s) for s in base.state.values()] or [0.0])
        t = torch.tensor([step], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        for name, p in params:
            out[name] = {"fp32": _full_hp(p, None), **{k: _full_hp(p, k) for k in STATE_KEYS}, "step": float(t)}
        return out
    if kind == "unfused":
        hp_of = {id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lg, hg)}
    else:
        hp_of = {id(p): p for _, p in params}
    state = _base(opt).state
    for name, p in params:
        hp = hp_of[id(p)]
        st = state.get(hp, {})
        out[name] = {"fp32": hp.detach().float().clone(),
                     **{k: (st[k].detach().float().clone() if k in st else torch.zeros_like(hp, dtype=torch.float32))
                        for k in STATE_KEYS},
                     "step": _step_of(st)}
    return out


# ---------------------------------------------------------------------- save / load
def collect(engine, module, ctx: ParallelContext, model_config) -> Optional[dict]:
    """Collective. This rank's universal entry for its rank file (None when unsupported)."""
    if supported(engine) is not None:
        return None
    meta = param_meta(module)
    entries = _local_entries(engine, module)
    owners = owner_index(list(meta), meta, ctx.dp_size, ctx.edp_size)
    mine = {n: e for n, e in entries.items()
            if owners[n] == (ctx.edp_rank if meta[n]["expert"] else ctx.dp_rank)}
    return {"format": FORMAT, "meta": meta, "params": mine, "coords": coords(ctx),
            "vocab_size": model_config.vocab_size, "make_vocab_divisible_by": model_config.make_vocab_divisible_by}


def _exchange(entries: dict, module, ctx: ParallelContext, meta: dict) -> dict:
    """Every local parameter's entry, each broadcast from the replica that stored it (collective)."""
    owners = owner_index(list(meta), meta, ctx.dp_size, ctx.edp_size)
    out = {}
    for name, p in module.named_parameters():
        expert = meta[name]["expert"]
        group, ranks, me = (ctx.edp_group, ctx.edp_ranks, ctx.edp_rank) if expert else \
            (ctx.dp_group, ctx.dp_ranks, ctx.dp_rank)
        n = p.numel()
        buf = torch.zeros(3 * n + 1, dtype=torch.float32)
        if owners[name] == me:
            if name not in entries:
                raise KeyError(f"universal state of {name} is missing from the rank that should hold it")
            e = entries[name]
            buf[:n] = e["fp32"].reshape(-1)
            buf[n:2 * n] = e["exp_avg"].reshape(-1)
            buf[2 * n:3 * n] = e["exp_avg_sq"].reshape(-1)
            buf[3 * n] = float(e["step"])
        if group is not None:
            dist.broadcast(buf, src=ranks[owners[name]], group=group)
        shape = p.shape
        out[name] = {"fp32": buf[:n].view(shape).clone(), "exp_avg": buf[n:2 * n].view(shape).clone(),
                     "exp_avg_sq": buf[2 * n:3 * n].view(shape).clone(), "step": float(buf[3 * n])}
    return out


def _step_tensor(step: float) -> torch.Tensor:
    return torch.tensor(float(step), dtype=torch.float32)


@torch.no_grad()
def restore(engine, module, ctx: ParallelContext, universal: dict) -> None:
    """Collective. Set master weights, model weights and Adam state of every local parameter."""
    reason = supported(engine)
    if reason is not None:
        raise RuntimeError(f"cannot restore universal optimizer state: {reason}")
    if universal.get("format") != FORMAT:
        raise ValueError(f"universal optimizer state format {universal.get('format')} is not {FORMAT}")
    meta = universal["meta"]
    local = dict(module.named_parameters())
    if set(meta) != set(local):
        diff = sorted(set(meta) ^ set(local))
        raise ValueError(f"universal state parameters differ from the model's: {diff[:5]}: is it the same model "
                         f"config?")
    for name, p in local.items():
        if list(p.shape) != list(meta[name]["local_shape"]):
            raise ValueError(f"universal state of {name} is for a local shape {meta[name]['local_shape']}, this "
                             f"rank holds {list(p.shape)}: the checkpoint was written for another layout")
    entries = _exchange(universal["params"], module, ctx, meta)
    opt = engine.optimizer
    kind = _kind(opt)
    if kind == "hp":
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        base = opt.optimizer
        step = max(e["step"] for e in entries.values())
        for flat in _hp_flats(opt):
            base.state[flat] = {"step": _step_tensor(step), **{k: torch.zeros_like(flat) for k in STATE_KEYS}}
        _relink(opt)
        for name, p in local.items():
            e = entries[name]
            p.data.copy_(e["fp32"].to(p.dtype))
            safe_set_full_fp32_param(p, e["fp32"])
            for k in STATE_KEYS:
                safe_set_full_optimizer_state(p, e[k], k)
        return
    if kind == "unfused":
        hp_of = {id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lg, hg)}
    else:
        hp_of = {id(p): p for p in local.values()}
    state = _base(opt).state
    for name, p in local.items():
        e, hp = entries[name], hp_of[id(p)]
        hp.data.copy_(e["fp32"].to(hp.dtype))
        p.data.copy_(e["fp32"].to(p.dtype))
        state[hp] = {"step": _step_tensor(e["step"]), **{k: e[k].to(hp.dtype).clone() for k in STATE_KEYS}}


def sync_lr_from_scheduler(engine) -> None:
    """After a universal restore the param groups still hold the initial lr: take the scheduler's."""
    sched = engine.lr_scheduler
    for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
        group["lr"] = lr
