"""TP/EP-invariant parameter initialisation.

A parameter's values must not depend on how the model is split: the same seed has to give the same
model at TP=1 and TP=4, at EP=1 and EP=8, or a change of layout between runs changes the experiment.
So every rank builds the FULL (single-process) tensor of each parameter from a generator seeded by
(seed, parameter name), fills it with the parameter's own `init_method`, and keeps its shard
(`params.shard_tensor`). Building the full tensor costs memory once per parameter, never the whole
model at a time.

Init methods are plain callables `fn(full_tensor, generator) -> None` that fill the tensor in place.
Layers attach them where they create a parameter (`set_init(param, normal(0.02))`); the factories
below are the ones the model uses.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Optional

import torch
import torch.nn as nn

from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.params import is_expert, shard_tensor

InitMethod = Callable[[torch.Tensor, torch.Generator], None]


# ------------------------------------------------------------------ init method factories
def normal(std: float) -> InitMethod:
    """N(0, std^2)."""
    def fn(t: torch.Tensor, g: torch.Generator) -> None:
        t.normal_(0.0, std, generator=g)
    fn.__qualname__ = f"normal(std={std:g})"
    return fn


def scaled_normal(std: float, num_layers: int) -> InitMethod:
    """N(0, (std / sqrt(2 L))^2): output projections that write into the residual stream (GPT-2).

    Each of the 2L residual branches adds a term; scaling keeps the stream's variance bounded in L.
    """
    return normal(std / math.sqrt(2.0 * num_layers))


def constant(value: float) -> InitMethod:
    def fn(t: torch.Tensor, g: torch.Generator) -> None:
        t.fill_(value)
    fn.__qualname__ = f"constant({value:g})"
    return fn


def zeros() -> InitMethod:
    return constant(0.0)


def ones() -> InitMethod:
    return constant(1.0)


def xavier_uniform(gain: float = 1.0) -> InitMethod:
    """Xavier/Glorot uniform on the last two dims read as (out, in).

    Leading dims are a stack (e.g. [experts, out, in]), not receptive field as in
    torch.nn.init (which would count the stack into the fans).
    """
    def fn(t: torch.Tensor, g: torch.Generator) -> None:
        if t.dim() < 2:
            raise ValueError(f"xavier_uniform needs >= 2 dims, got shape {tuple(t.shape)}")
        fan_out, fan_in = t.shape[-2], t.shape[-1]
        bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
        t.uniform_(-bound, bound, generator=g)
    fn.__qualname__ = f"xavier_uniform(gain={gain:g})"
    return fn


def set_init(param: nn.Parameter, fn: Optional[InitMethod]) -> nn.Parameter:
    """Attach an init method to a parameter (None leaves the default)."""
    if fn is not None:
        param.init_method = fn
    return param


# ------------------------------------------------------------------ the driver
def param_seed(seed: int, name: str) -> int:
    """A generator seed from (seed, parameter name); stable across processes and Python runs.

    crc32 rather than hash(): Python salts str hashes per process. The result fits in 32 bits because
    torch's CPU generator (mt19937) only uses the low 32 bits of its seed: `seed << 32 | crc` would
    give every seed the same weights. The odd multiplier spreads consecutive seeds apart.
    """
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode("utf-8"))) & 0xFFFFFFFF


def full_shape(param: torch.Tensor, ctx: ParallelContext, vocab_size: int) -> list[int]:
    """The single-process shape of `param`, with vocab dims at the TRUE vocab size (unpadded)."""
    shape = list(param.shape)
    tp_dim = getattr(param, "tp_dim", None)
    if tp_dim is not None:
        shape[tp_dim] = vocab_size if getattr(param, "vocab_dim", None) is not None \
            else shape[tp_dim] * ctx.tp_size
    if is_expert(param):
        shape[param.ep_dim] *= ctx.ep_size
    return shape


@torch.no_grad()
def init_parameters(model: nn.Module, ctx: ParallelContext, seed: int = 1234, config=None) -> None:
    """Initialise every parameter of `model` so that the full model is the same for any TP/EP.

    Rules, per parameter (named as in `model.named_parameters()`):
    1. `param.init_method` when set (`fn(full_tensor, generator)`);
    2. otherwise, for tensors of >= 2 dims: N(0, config.init_std^2);
    3. otherwise (0-/1-dim without an init method) the constructor's value is kept: such params are
       built from constants (zeros, ones, a temperature), which are the same for every layout.
    `config` defaults to `model.config` (needs `vocab_size`, `init_std`, `padded_vocab_size`).
    """
    cfg = config if config is not None else model.config
    padded_vocab = cfg.padded_vocab_size(ctx.tp_size)
    default = normal(cfg.init_std)
    for name, p in model.named_parameters():
        fn = getattr(p, "init_method", None)
        if fn is None:
            if p.dim() < 2:
                continue
            fn = default
        gen = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
        # 1. full tensor in fp32 on CPU (the generator's device), 2. fill, 3. keep this rank's shard.
        full = torch.empty(full_shape(p, ctx, cfg.vocab_size), dtype=torch.float32)
        fn(full, gen)
        p.copy_(shard_tensor(full, p, ctx, padded_vocab).to(dtype=p.dtype, device=p.device))
