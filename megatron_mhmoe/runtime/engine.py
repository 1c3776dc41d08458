"""The only module that imports deepspeed.

What DeepSpeed 0.19.8 keys on, and how the MH-MoE model meets it:
1. MoE awareness: the engine sets `has_moe_layers` only for modules that are instances of
   `deepspeed.moe.layer.MoE`; only then does ZeRO-1/2 partition expert params over the expert-data-parallel
   group. Each MHMoELayer gets a parameter-free `_MoEMarker` child that is such an instance.
2. Groups: the engine calls `set_deepspeed_parallelism()` on every module that has it; the marker registers
   the ParallelContext's EP/EDP groups in deepspeed.utils.groups under the name `ep_size_<EP>`.
3. Param groups: expert params (`allreduce=False`, `group_name`) go to `{'moe': True, 'name': ...}` groups.
4. TP-partial grads (MoE head/merge/router, sequence-parallel norms): summed over TP by a grad hook, so the
   sum is done before ZeRO's reduction hooks see the gradient.
5. Checkpoints do not go through `engine.save_checkpoint`: DeepSpeed writes expert files only for its own
   native expert layout. runtime/checkpoint.py saves every rank's model shard and optimizer partition
   from the engine's state dicts instead.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch
import torch.nn as nn

from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.params import is_expert

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import deepspeed  # noqa: E402
from deepspeed.moe.layer import MoE as _DeepSpeedMoE  # noqa: E402
from deepspeed.utils import groups as _ds_groups  # noqa: E402


def skip_cpu_jit_ops() -> None:
    """DeepSpeed compiles a shared-memory allreduce op at init on CPU (~25 s); gloo does not need it."""
    mod = sys.modules.get("deepspeed.comm.torch")
    if mod is not None and not torch.cuda.is_available():
        mod.build_shm_op = lambda: None


class _MoEMarker(_DeepSpeedMoE):
    """Makes the engine treat the model as an MoE model and registers our expert groups. Holds no params."""

    def __init__(self, num_experts: int, ctx: ParallelContext, ep_group, edp_group):
        nn.Module.__init__(self)  # not MoE.__init__: that would build DeepSpeed's own experts and gate
        self.num_experts = num_experts
        self.ep_size = ctx.ep_size
        self.num_local_experts = num_experts // ctx.ep_size
        self.expert_group_name = ctx.ep_group_name
        self.enable_expert_tensor_parallelism = False
        self._ctx, self._ep_group, self._edp_group = ctx, ep_group, edp_group

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        name = self.expert_group_name
        _ds_groups._EXPERT_PARALLEL_GROUP[name] = self._ep_group
        _ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(self._ctx.ep_ranks)
        _ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = self._edp_group
        _ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(self._ctx.edp_ranks)

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("_MoEMarker is a DeepSpeed registration shim, not a layer")


def _real_group(group, ranks: list[int]):
    """DeepSpeed needs a process group even for a size-1 dimension; ours are None there."""
    if group is not None:
        return group
    import torch.distributed as dist
    mine = None
    for r in range(dist.get_world_size()):  # collective: every rank creates every singleton group
        g = dist.new_group(ranks=[r])
        if r == dist.get_rank():
            mine = g
    return mine


def attach_moe_markers(model: nn.Module, ctx: ParallelContext) -> int:
    from megatron_mhmoe.moe.layer import MHMoELayer
    layers = [m for m in model.modules() if isinstance(m, MHMoELayer)]
    if not layers:
        return 0
    ep_group = _real_group(ctx.ep_group, ctx.ep_ranks)
    edp_group = _real_group(ctx.edp_group, ctx.edp_ranks)
    for layer in layers:
        layer.ds_marker = _MoEMarker(layer.moe.num_experts, ctx, ep_group, edp_group)
    return len(layers)


def install_tp_partial_grad_hooks(model: nn.Module, ctx: ParallelContext) -> int:
    """Sum over TP the grads of params each TP rank fed with other tokens, inside backward."""
    if ctx.tp_group is None:
        return 0
    n = 0
    for p in model.parameters():
        if getattr(p, "tp_partial_grad", False):
            p.register_hook(lambda g, group=ctx.tp_group: comm.all_reduce_(g.clone(), group))
            n += 1
    return n


def mark_norm_ownership(model: nn.Module) -> None:
    """Tell DeepSpeed's ZeRO grad-norm which params every TP rank must count.

    ZeRO counts a param on TP rank 0 only unless it is marked `model_parallel`; TP shards and local
    experts differ between TP ranks, so each rank must count its own (then ZeRO sums over DP and TP,
    which together cover the world once).
    """
    for p in model.parameters():
        if getattr(p, "tp_dim", None) is not None or is_expert(p):
            p.model_parallel = True


def param_groups(model: nn.Module, weight_decay: float, ctx: ParallelContext) -> list[dict]:
    """Non-expert and expert params, each split into decay / no-decay (biases, norms, 0/1-dim params)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2 and "norm" not in name
        key = ("expert" if is_expert(p) else "dense", decay)
        groups.setdefault(key, []).append(p)
    out = []
    for (kind, decay), params in sorted(groups.items()):
        g = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if kind == "expert":
            g.update(moe=True, name=ctx.ep_group_name)
        out.append(g)
    return out


def build_ds_config(run_cfg, world_size: int, base: Optional[dict] = None) -> dict:
    """A DeepSpeed config from the run config; batch fields always come from the run config."""
    t = run_cfg.train
    dp = world_size // run_cfg.parallel.tp
    cfg = dict(base or {})
    cfg.update(
        train_batch_size=t.global_batch_size,
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum_steps,
        # ZeRO-1/2 count every expert once (mark_norm_ownership); the engine's stage-0 fp32 clip averages
        # per-rank norms over DP, which is wrong once DP ranks hold different experts: the training
        # loop clips stage-0 fp32 itself (parallel.grads.global_grad_norm). Stage-0 bf16/fp16 keep their
        # gradients in the engine's fp32 copies, out of the loop's reach, so the engine clips them.
        gradient_clipping=0.0 if (t.zero_stage == 0 and t.precision == "fp32") else float(t.clip_grad),
        steps_per_print=10 ** 9,  # we log ourselves
        wall_clock_breakdown=False,
    )
    assert t.micro_batch_size * t.grad_accum_steps * dp == t.global_batch_size
    zero = dict(cfg.get("zero_optimization", {}))
    zero["stage"] = t.zero_stage
    if t.zero_stage in (1, 2):
        # DeepSpeed's MoE support in ZeRO-1/2 requires both.
        zero.setdefault("contiguous_gradients", True)
        zero.setdefault("reduce_scatter", True)
        zero.setdefault("overlap_comm", False)
    if t.offload_optimizer:
        if t.zero_stage == 0:
            raise ValueError("train.offload_optimizer needs ZeRO stage 1 or 2 (or 3 for dense models)")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg["zero_optimization"] = zero
    # Our optimizer is a torch AdamW built here, so no DeepSpeed op is compiled (also under offload).
    cfg["zero_force_ds_cpu_optimizer"] = False
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    cfg["bf16"] = {"enabled": t.precision == "bf16"}
    if t.precision == "fp16":
        fp16 = dict(cfg.get("fp16", {}))
        fp16.update(enabled=True)
        fp16.setdefault("loss_scale", 0)  # dynamic
        fp16.setdefault("initial_scale_power", 16)
        fp16.setdefault("loss_scale_window", 1000)
        fp16.setdefault("hysteresis", 2)
        fp16.setdefault("min_loss_scale", 1)
        cfg["fp16"] = fp16
    else:
        cfg["fp16"] = {"enabled": False}
    return cfg


def initialize(model: nn.Module, run_cfg, ctx: ParallelContext, ds_config: dict, lr_lambda):
    """deepspeed.initialize with the context as mpu, MoE groups registered and TP-partial hooks installed."""
    skip_cpu_jit_ops()
    attach_moe_markers(model, ctx)
    install_tp_partial_grad_hooks(model, ctx)
    mark_norm_ownership(model)
    t = run_cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay, ctx), lr=t.lr,
                                  betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=ctx,
                                           config=ds_config, dist_init_required=False)
    return engine


def init_distributed(timeout_s: float) -> None:
    """Join the job's process group (env:// from the launcher) with a collective timeout."""
    import datetime

    import torch.distributed as dist
    if dist.is_initialized():
        return
    skip_cpu_jit_ops()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)
    skip_cpu_jit_ops()


def checkpoint_safe_globals() -> list:
    """DeepSpeed classes inside ZeRO optimizer state dicts: the allow-list for weights_only loading.

    Plain data holders (an enum, a named tuple of offsets, loss-scaler state); nothing that runs code.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def engine_loss_scale(engine) -> float:
    try:
        return float(engine.optimizer.cur_scale) if hasattr(engine.optimizer, "cur_scale") else 1.0
    except Exception:  # pragma: no cover - optimizer wrappers differ across stages
        return 1.0


def skipped_steps(engine) -> int:
    return int(getattr(engine, "skipped_steps", 0))
