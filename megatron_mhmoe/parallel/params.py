"""How each parameter is laid out across ranks, recorded on the parameter itself.

Attributes (set by the layers that create the parameters):
- `tp_dim`: split contiguously along this dim over the TP group (absent: replicated over TP).
- `vocab_dim`: this dim is a vocabulary dim padded per TP size; full tensors hold the true vocab.
- `tp_partial_grad`: replicated over TP but each TP rank feeds it different tokens (MoE head/merge/
  router, sequence-parallel norms): its gradient is summed over the TP group.
- `expert` + `ep_dim`: a stack of this rank's local experts along `ep_dim`; reduced over the EDP
  group. `allreduce=False` and `group_name` are DeepSpeed's spelling of the same fact.

`shard_full_state_dict` and `gather_full_state_dict` convert between the single-process ("full")
state dict and a rank's local one using only these attributes, so a layer that marks its params
correctly gets equivalence tests, resharding and export for free.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.context import ParallelContext


def mark_tp(param: nn.Parameter, dim: int, vocab: bool = False) -> nn.Parameter:
    param.tp_dim = dim
    if vocab:
        param.vocab_dim = dim
    return param


def mark_tp_partial(param: nn.Parameter) -> nn.Parameter:
    param.tp_partial_grad = True
    return param


def mark_expert(param: nn.Parameter, ctx: ParallelContext, dim: int = 0) -> nn.Parameter:
    param.expert = True
    param.ep_dim = dim
    param.allreduce = False
    param.group_name = ctx.ep_group_name
    return param


def is_expert(param: torch.Tensor) -> bool:
    return bool(getattr(param, "expert", False))


def _pad_vocab(t: torch.Tensor, dim: int, padded: int) -> torch.Tensor:
    extra = padded - t.shape[dim]
    if extra < 0:
        raise ValueError(f"vocab dim {dim} has {t.shape[dim]} rows, more than the padded size {padded}")
    if extra == 0:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = extra
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)


def shard_piece(full: torch.Tensor, tp_dim: Optional[int], vocab: bool, ep_dim: Optional[int], tp_size: int,
                tp_rank: int, ep_size: int, ep_rank: int, padded_vocab: Optional[int] = None) -> torch.Tensor:
    """The piece of `full` that (tp_rank, ep_rank) holds: vocabulary padded, then TP chunk, then EP chunk
    (tp_dim / ep_dim None: not split that way). Shared by live models and offline checkpoint tools."""
    t = full
    if tp_dim is not None:
        if vocab:
            if padded_vocab is None:
                raise ValueError("padded_vocab is required to shard a vocabulary-parallel parameter")
            t = _pad_vocab(t, tp_dim, padded_vocab)
        t = t.chunk(tp_size, dim=tp_dim)[tp_rank]
    if ep_dim is not None:
        t = t.chunk(ep_size, dim=ep_dim)[ep_rank]
    return t


def shard_tensor(full: torch.Tensor, param: torch.Tensor, ctx: ParallelContext,
                 padded_vocab: Optional[int] = None) -> torch.Tensor:
    """This rank's piece of a full tensor, by the layout attributes of `param`."""
    t = shard_piece(full, getattr(param, "tp_dim", None), getattr(param, "vocab_dim", None) is not None,
                    param.ep_dim if is_expert(param) else None, ctx.tp_size, ctx.tp_rank, ctx.ep_size,
                    ctx.ep_rank, padded_vocab)
    if t.shape != param.shape:
        raise ValueError(f"full tensor {tuple(full.shape)} sharded to {tuple(t.shape)} but the local "
                         f"parameter is {tuple(param.shape)}: the checkpoint does not match this model")
    return t.clone()


def gather_tensor(local: torch.Tensor, param: torch.Tensor, ctx: ParallelContext,
                  true_vocab: Optional[int] = None) -> torch.Tensor:
    """The full tensor from every rank's piece (collective over TP and EP groups)."""
    t = local.detach()
    if is_expert(param):
        t = comm.all_gather(t, param.ep_dim, ctx.ep_group)
    dim = getattr(param, "tp_dim", None)
    if dim is not None:
        t = comm.all_gather(t, dim, ctx.tp_group)
        if getattr(param, "vocab_dim", None) is not None and true_vocab is not None:
            t = t.narrow(dim, 0, true_vocab)
    return t.clone()


def shard_full_state_dict(model: nn.Module, full: dict, ctx: ParallelContext,
                          padded_vocab: Optional[int] = None) -> dict:
    """Local state dict for `model` from a single-process state dict (params by name)."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(full))
    if missing:
        raise ValueError(f"full state dict lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
    out = {}
    for name, local in model.state_dict().items():
        if name in params:
            out[name] = shard_tensor(full[name], params[name], ctx, padded_vocab)
        else:  # buffers are replicated
            out[name] = full.get(name, local)
    return out


def gather_full_state_dict(model: nn.Module, ctx: ParallelContext, true_vocab: Optional[int] = None) -> dict:
    """Single-process state dict of the parameters (every rank gets it; collective)."""
    return {name: gather_tensor(p, p, ctx, true_vocab) for name, p in model.named_parameters()}


def gather_full_grads(model: nn.Module, ctx: ParallelContext, true_vocab: Optional[int] = None) -> dict:
    """Full gradients, by the same layout (call after reduce_gradients)."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = gather_tensor(g, p, ctx, true_vocab)
    return out
