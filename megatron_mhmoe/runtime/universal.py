"""Universal optimizer state: per parameter, independent of the ZeRO stage and of DP size.

Every checkpoint rank file carries, next to DeepSpeed's native optimizer partition, a `universal` entry:
    meta:   name -> how the parameter is laid out (tp_dim, vocab, expert/ep_dim, tp_partial, local shape)
    params: name -> {fp32, exp_avg, exp_avg_sq, step} for this rank's TP/EP-local parameter (not ZeRO-split)
    coords: this rank's tp/ep/dp/edp ranks and sizes
Only one replica stores each parameter: dense parameter i on the DP rank i % DP, expert parameter j on the
EDP rank j % EDP, so the universal copy costs one model's optimizer state in total, not DP of them.

`collect` (save) and `restore` (load) are collective. The engine (runtime/engine.py, the only module
that knows DeepSpeed's optimizer internals) reads and writes the fp32 master weights and Adam moments;
this module decides who stores what and moves it between replicas.
tools/reshard_checkpoint.py gathers these into full tensors and re-shards them for another layout;
train.py restores from them when a checkpoint has no native optimizer partition.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_mhmoe.parallel import comm
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
                     "tp_partial": bool(getattr(p, "tp_partial_grad", False)), "local_shape": full_local_shape(p)}
    return out


def full_local_shape(p: torch.Tensor) -> list[int]:
    """This rank's TP/EP-local shape; a ZeRO-3 parameter is partitioned further and keeps it in ds_shape."""
    return list(getattr(p, "ds_shape", p.shape))


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


# ---------------------------------------------------------------------- save / load
def collect(engine, module, ctx: ParallelContext, model_config) -> Optional[dict]:
    """Collective. This rank's universal entry for its rank file (None when the engine cannot read it)."""
    entries = engine.universal_entries()
    if entries is None:
        return None
    meta = param_meta(module)
    owners = owner_index(list(meta), meta, ctx.dp_size, ctx.edp_size)
    mine = {n: e for n, e in entries.items()
            if owners[n] == (ctx.edp_rank if meta[n]["expert"] else ctx.dp_rank)}
    return {"format": FORMAT, "meta": meta, "params": mine, "coords": coords(ctx),
            "vocab_size": model_config.vocab_size, "make_vocab_divisible_by": model_config.make_vocab_divisible_by}


def _exchange(entries: dict, module, ctx: ParallelContext, meta: dict, device) -> dict:
    """Every local parameter's entry, each broadcast from the replica that stored it (collective)."""
    owners = owner_index(list(meta), meta, ctx.dp_size, ctx.edp_size)
    out = {}
    for name, p in module.named_parameters():
        expert = meta[name]["expert"]
        group, ranks, me = (ctx.edp_group, ctx.edp_ranks, ctx.edp_rank) if expert else \
            (ctx.dp_group, ctx.dp_ranks, ctx.dp_rank)
        shape = full_local_shape(p)
        n = math.prod(shape)
        buf = torch.zeros(3 * n + 1, dtype=torch.float32, device=device)
        if owners[name] == me:
            if name not in entries:
                raise KeyError(f"universal state of {name} is missing from the rank that should hold it")
            e = entries[name]
            buf[:n] = e["fp32"].reshape(-1)
            buf[n:2 * n] = e["exp_avg"].reshape(-1)
            buf[2 * n:3 * n] = e["exp_avg_sq"].reshape(-1)
            buf[3 * n] = float(e["step"])
        comm.broadcast_(buf, ranks[owners[name]], group)
        out[name] = {"fp32": buf[:n].view(shape).clone(), "exp_avg": buf[n:2 * n].view(shape).clone(),
                     "exp_avg_sq": buf[2 * n:3 * n].view(shape).clone(), "step": float(buf[3 * n])}
    return out


@torch.no_grad()
def restore(engine, module, ctx: ParallelContext, universal: dict) -> None:
    """Collective. Set master weights, model weights and Adam state of every local parameter."""
    if universal.get("format") != FORMAT:
        raise ValueError(f"universal optimizer state format {universal.get('format')} is not {FORMAT}")
    meta = universal["meta"]
    local = dict(module.named_parameters())
    if set(meta) != set(local):
        diff = sorted(set(meta) ^ set(local))
        raise ValueError(f"universal state parameters differ from the model's: {diff[:5]}: is it the same model "
                         f"config?")
    for name, p in local.items():
        shape = full_local_shape(p)
        if shape != list(meta[name]["local_shape"]):
            raise ValueError(f"universal state of {name} is for a local shape {meta[name]['local_shape']}, this "
                             f"rank holds {shape}: the checkpoint was written for another layout")
    engine.load_universal_entries(_exchange(universal["params"], module, ctx, meta, engine.device))
