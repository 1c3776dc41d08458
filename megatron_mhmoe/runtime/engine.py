"""The training engine: the only module that imports deepspeed, and the one object that owns the device.

`Engine` wraps DeepSpeed's engine. Everything the training step hands to the model or to a collective is
created on, or moved to, `Engine.device` (`cuda:LOCAL_RANK` on GPU nodes, `cpu` otherwise). It owns
forward/backward, the optimizer step, the gradient-clipping policy, the loss scale, the gradient norm,
the checkpoint state (ZeRO-3 parameters gathered) and the universal per-parameter optimizer state
(DeepSpeed's fragment mappings).

What DeepSpeed 0.19.8 keys on, and how the MH-MoE model meets it:
1. MoE awareness: the engine sets `has_moe_layers` only for modules that are instances of
   `deepspeed.moe.layer.MoE`; only then does ZeRO-1/2 partition expert params over the expert-data-parallel
   group. Each MHMoELayer gets a parameter-free `_MoEMarker` child that is such an instance.
2. Groups: the engine calls `set_deepspeed_parallelism()` on every module that has it; the marker registers
   the ParallelContext's EP/EDP groups in deepspeed.utils.groups under the name `ep_size_<EP>`.
3. Param groups: expert params (`allreduce=False`, `group_name`) go to `{'moe': True, 'name': ...}` groups.
4. TP-partial grads (MoE head/merge/router, sequence-parallel norms): summed over TP by a grad hook
   (parallel.grads), so the sum is done before ZeRO's reduction hooks see the gradient.
5. Checkpoints do not go through `engine.save_checkpoint`: DeepSpeed writes expert files only for its own
   native expert layout. runtime/checkpoint.py saves every rank's `Engine.state_dict()` instead.

The clip policy, once: ZeRO-1/2/3 clip inside DeepSpeed (ZeRO-1/2 count each TP shard and expert once:
`mark_norm_ownership`). At ZeRO-0 DeepSpeed's norm is wrong once DP ranks hold different experts (fp32:
per-rank norms averaged over DP; bf16: BF16_Optimizer's norm leaves every expert out), so at ZeRO-0 in
every precision DeepSpeed's clipping is off and `Engine.step` computes the exact norm itself
(parallel.grads.global_norm) over the gradients the optimizer will apply: the params' grads (fp32), the
fp32 gradient buffers (bf16) or the loss-scaled fp16 grads divided by the scale (fp16). A non-finite norm
skips the update on every rank (the norm is global, so every rank decides the same).
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from megatron_mhmoe.model.compile import compile_blocks
from megatron_mhmoe.parallel import comm, grads
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.params import is_expert

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

# DeepSpeed 0.19.8's ZeRO gathers with torch.distributed.all_gather_into_tensor, which torch 2.13 marks
# deprecated, once per rank and run: nothing a user can act on, so it is not shown.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)

import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.moe.layer import MoE as _DeepSpeedMoE  # noqa: E402
from deepspeed.utils import groups as _ds_groups  # noqa: E402


def deepspeed_config_api():
    """(DeepSpeedConfig, the base class of its pydantic section models, deepspeed's version): what
    runtime/ds_schema.py checks a --deepspeed_config file's keys against (this module is the one that imports
    deepspeed)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel
    return DeepSpeedConfig, DeepSpeedConfigModel, deepspeed.__version__


def skip_cpu_jit_ops() -> None:
    """DeepSpeed compiles a shared-memory allreduce op at init on CPU (~25 s); gloo does not need it."""
    mod = sys.modules.get("deepspeed.comm.torch")
    if mod is not None and not torch.cuda.is_available():
        mod.build_shm_op = lambda: None


def init_distributed(timeout_s: float) -> torch.device:
    """Join the job's process group (env:// from the launcher) with a collective timeout; the device."""
    from megatron_mhmoe.parallel import devices
    skip_cpu_jit_ops()
    device = devices.init_process_group(timeout_s)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)
    skip_cpu_jit_ops()
    return accelerator_device()


def accelerator_device() -> torch.device:
    """Where DeepSpeed puts the model: this process's GPU on CUDA nodes, else the CPU."""
    return torch.device(get_accelerator().current_device_name())


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


def attach_moe_markers(model: nn.Module, ctx: ParallelContext) -> int:
    from megatron_mhmoe.moe.layer import MHMoELayer
    layers = [m for m in model.modules() if isinstance(m, MHMoELayer)]
    if not layers:
        return 0
    # DeepSpeed needs a process group even for a size-1 dimension; ours are None there.
    ep_group = ctx.ep_group if ctx.ep_group is not None else ctx.self_group()
    edp_group = ctx.edp_group if ctx.edp_group is not None else ctx.self_group()
    for layer in layers:
        layer.ds_marker = _MoEMarker(layer.moe.num_experts, ctx, ep_group, edp_group)
    return len(layers)


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
        # ZeRO-0 clips in Engine.step with the exact norm (module docstring); ZeRO-1/2/3 inside DeepSpeed.
        gradient_clipping=0.0 if t.zero_stage == 0 else float(t.clip_grad),
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


def checkpoint_safe_globals() -> list:
    """DeepSpeed classes inside ZeRO optimizer state dicts: the allow-list for weights_only loading.

    Plain data holders (an enum, a named tuple of offsets, loss-scaler state); nothing that runs code.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


@dataclass
class StepResult:
    """What one optimizer step reports."""

    grad_norm: float
    """Global L2 norm of the gradient before clipping, every element counted once (nan/inf: not finite)."""
    skipped: bool
    """The update was not applied (non-finite gradient, or an fp16 overflow that lowered the loss scale)."""


class Engine:
    """DeepSpeed's engine for one model, the device it runs on, and the clip policy (module docstring)."""

    def __init__(self, model: nn.Module, run_cfg, ctx: ParallelContext, lr_lambda, ds_base: Optional[dict] = None):
        skip_cpu_jit_ops()
        self.ctx, self.cfg = ctx, run_cfg
        t = run_cfg.train
        self.zero_stage, self.precision, self.clip_grad = t.zero_stage, t.precision, float(t.clip_grad)
        self.device = accelerator_device()
        attach_moe_markers(model, ctx)
        if t.compile:  # in place, before DeepSpeed wraps the model (model/compile.py)
            compile_blocks(model, t.compile_backend)
        grads.install_tp_partial_grad_hooks(model, ctx)
        mark_norm_ownership(model)
        self.ds_config = build_ds_config(run_cfg, ctx.world_size, ds_base)
        optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay, ctx), lr=t.lr,
                                      betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=ctx,
                                                config=self.ds_config, dist_init_required=False)
        self.module = self.ds.module
        self.optimizer = self.ds.optimizer
        self.lr_scheduler = self.ds.lr_scheduler
        self._skipped_here = 0

    # ------------------------------------------------------------------ compute
    def to_device(self, batch: dict) -> dict:
        """A batch's tensors on the engine's device (DeepSpeed's forward does not move inputs)."""
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; DeepSpeed counts micro-batches in its step(), so a micro-batch that
        does not end the global batch gets that (update-free) call here, and `step` is once per global batch."""
        self.ds.backward(loss)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def step(self) -> StepResult:
        """The optimizer step at the end of a global batch (after the last micro-batch's backward)."""
        assert self.ds.is_gradient_accumulation_boundary(), "Engine.step is once per global batch"
        skipped_before = self.skipped_steps
        if self.zero_stage == 0:
            pairs, inv_scale = self._grads_the_optimizer_applies()
            norm = float(grads.global_norm(pairs, self.ctx, self.device)) * inv_scale
            if not math.isfinite(norm):
                if self.precision == "fp16" and pairs:
                    # An overflow: DeepSpeed's loss scaler must see it on every rank (the norm is global, a
                    # rank's own grads may be finite) to skip the step and lower the scale everywhere alike.
                    pairs[0][1].view(-1)[0] = float("inf")
                    self.ds.step()
                else:
                    self._step_without_update()
                return StepResult(norm, True)
            coef = grads.clip_coefficient(norm, self.clip_grad)
            if coef != 1.0:
                for _, g in pairs:
                    g.mul_(coef)
            self.ds.step()
            return StepResult(norm, self.skipped_steps > skipped_before)
        self.ds.step()
        gn = self.ds.get_global_grad_norm()
        norm = float(gn) if gn is not None else float("nan")
        return StepResult(norm, self.skipped_steps > skipped_before)

    def _grads_the_optimizer_applies(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float]:
        """(param, gradient) pairs as the ZeRO-0 optimizer will read them, and 1/loss scale."""
        opt = self.optimizer
        if hasattr(opt, "bf16_groups") and hasattr(opt, "fp32_groups_gradients"):  # BF16_Optimizer
            return ([(lp, opt.fp32_groups_gradients[i][j]) for i, group in enumerate(opt.bf16_groups)
                     for j, lp in enumerate(group) if opt.fp32_groups_has_gradients[i][j]], 1.0)
        if self.precision == "fp16" and hasattr(opt, "fp16_groups"):  # FP16 (unfused): loss-scaled fp16 grads
            return ([(p, p.grad) for group in opt.fp16_groups for p in group if p.grad is not None],
                    1.0 / self.loss_scale)
        return [(p, p.grad) for p in self.module.parameters() if p.grad is not None], 1.0

    def _step_without_update(self) -> None:
        """Advance the schedule and clear the gradients without touching the weights (non-finite norm)."""
        opt = self.optimizer
        if hasattr(opt, "clear_hp_grads"):  # BF16_Optimizer: fp32 buffers persist across steps
            opt.clear_hp_grads()
        for p in self.module.parameters():
            p.grad = None  # torch's AdamW leaves a param without a grad untouched
        if hasattr(opt, "fp32_groups_flat_partition"):
            real = opt.step

            def skip(closure=None):
                opt.overflow = True
                if hasattr(opt, "clear_lp_grads"):
                    opt.clear_lp_grads()

            opt.step = skip
            try:
                self.ds.step()
            finally:
                opt.step = real
        else:
            self.ds.step()
        self._skipped_here += 1

    @property
    def skipped_steps(self) -> int:
        """Steps whose update was not applied: DeepSpeed's fp16 overflow skips plus ZeRO-0 non-finite norms."""
        return int(getattr(self.ds, "skipped_steps", 0)) + self._skipped_here

    @property
    def loss_scale(self) -> Optional[float]:
        """The fp16 dynamic loss scale (None in bf16/fp32, where there is none). FP16_UnfusedOptimizer (ZeRO-0)
        keeps it in loss_scale_config, the ZeRO optimizers in cur_scale: DeepSpeed's own accessor reads both."""
        if self.precision != "fp16":
            return None
        scale = self.ds._get_optimizer_loss_scale()
        return float(scale) if scale is not None else None

    @property
    def lr(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    @property
    def global_steps(self) -> int:
        return self.ds.global_steps

    @global_steps.setter
    def global_steps(self, value: int) -> None:
        self.ds.global_steps = value

    # ------------------------------------------------------------------ checkpoint state
    def _zero3_params(self) -> list:
        return [p for p in self.module.parameters() if hasattr(p, "ds_id")]

    def model_state_dict(self) -> dict:
        """This rank's TP/EP-local weights in full. Under ZeRO-3 a collective: each partitioned parameter is
        gathered in turn and copied to the host (the device holds one full parameter at a time, not the model),
        so every rank's file holds full tensors whatever the DP size."""
        if not self._zero3_params():
            return self.module.state_dict()
        out = {}
        for name, t in self.module.state_dict(keep_vars=True).items():
            if hasattr(t, "ds_id"):
                with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                    out[name] = t.detach().to("cpu", copy=True)
            else:
                out[name] = t.detach()
        return out

    @torch.no_grad()
    def load_model_state_dict(self, state: dict) -> None:
        """Collective under ZeRO-3: each full tensor is written into the gathered parameter, then re-partitioned."""
        if not self._zero3_params():
            self.module.load_state_dict(state)
            return
        own = self.module.state_dict(keep_vars=True)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        full = {k: list(getattr(t, "ds_shape", t.shape)) for k, t in own.items()}
        # Checked by hand: copy_ would broadcast a smaller tensor into a gathered parameter without complaint.
        wrong = [f"{k} {list(state[k].shape)} given vs {full[k]} here" for k in own
                 if k in state and list(state[k].shape) != full[k]]
        if missing or unexpected or wrong:
            raise RuntimeError(f"model state does not fit this model: missing {missing[:5]}, unexpected "
                               f"{unexpected[:5]}, shapes {wrong[:5]}")
        for name, t in own.items():
            if hasattr(t, "ds_id"):
                with deepspeed.zero.GatheredParameters([t], modifier_rank=0):
                    t.data.copy_(state[name])
            else:
                t.data.copy_(state[name])

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        if self.ds.zero_optimization():
            # ZeRO wants the list of every DP rank's state; each rank only reads its own entry (stage 3: entry
            # [DP rank]; it restores its fp32 partition from the saved one and ignores load_from_fp32_weights).
            self.optimizer.load_state_dict([state] * self.ds.dp_world_size, load_from_fp32_weights=True)
        else:
            self.optimizer.load_state_dict(state)

    # ------------------------------------------------------------------ universal optimizer state
    def universal_entries(self) -> Optional[dict]:
        """Collective. name -> {fp32, exp_avg, exp_avg_sq, step} of every local parameter (not ZeRO-split),
        or None when this optimizer's per-parameter layout is unknown."""
        from megatron_mhmoe.runtime import universal
        acc = _OptimizerAccess(self)
        return None if acc.kind is None else acc.entries(universal.STATE_KEYS)

    def load_universal_entries(self, entries: dict) -> None:
        """Collective. Set master weights, model weights and Adam state of every local parameter."""
        from megatron_mhmoe.runtime import universal
        acc = _OptimizerAccess(self)
        if acc.kind is None:
            raise RuntimeError(f"cannot restore universal optimizer state: optimizer {type(self.optimizer).__name__} "
                               f"has no known per-parameter state layout")
        acc.restore(entries, universal.STATE_KEYS)
        # The param groups still hold the initial lr: take the scheduler's.
        for group, lr in zip(self.lr_scheduler.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
            group["lr"] = lr


def _step_of(state: dict) -> float:
    s = state.get("step", 0.0)
    return float(s.item() if torch.is_tensor(s) else s)


class _OptimizerAccess:
    """Per-parameter fp32 master weights and Adam moments, whatever holds them.

    kinds: 'z3' (ZeRO-3 partitions, DeepSpeed's safe_* accessors), 'hp' (fragment mappings of ZeRO-1/2 and
    BF16_Optimizer), 'unfused' (fp32 copies of FP16_UnfusedOptimizer), 'torch' (plain AdamW at ZeRO-0 fp32).
    """

    def __init__(self, engine: Engine):
        self.engine, self.opt = engine, engine.optimizer
        opt = self.opt
        if any(hasattr(p, "ds_id") for p in engine.module.parameters()):
            self.kind = "z3"
        elif hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            self.kind = "hp"
        elif hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups") and hasattr(opt, "optimizer"):
            self.kind = "unfused"
        elif isinstance(opt, torch.optim.Optimizer):
            self.kind = "torch"
        else:
            self.kind = None

    @property
    def base(self):
        return self.opt.optimizer if self.kind in ("hp", "unfused", "z3") else self.opt

    def _relink(self) -> None:
        """DeepSpeed 0.19.8 links fragment views of the Adam state after the FIRST group's step only, so the
        other groups' fragments stay empty (safe_get_full_optimizer_state raises): link them all again."""
        self.opt._hp_optimizer_states_linked = False
        self.opt._lazy_init_hp_params_optimizer_state()

    def _global_step(self) -> float:
        step = max([_step_of(s) for s in self.base.state.values()] or [0.0])
        t = torch.tensor([step], dtype=torch.float64, device=self.engine.device)
        comm.all_reduce_(t, comm.world_group(), op="max")
        return float(t)

    def _full_hp(self, p, key: Optional[str]) -> torch.Tensor:
        """The fp32 master (key None) or an Adam moment of `p`, assembled over its ZeRO group (collective).
        Like DeepSpeed's get_full_hp_param, but a moment not created yet (no step taken) reads as zeros."""
        buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        mapping = p._hp_mapping
        if mapping is not None:
            src = mapping.hp_fragment if key is None else (mapping.optim_fragment or {}).get(key)
            if src is not None:
                addr = mapping.lp_fragment_address
                buf.narrow(0, addr.start, addr.numel).copy_(src.detach().float())
        comm.all_reduce_(buf, p._dp_group)
        return buf.view(p.shape)

    def entries(self, keys) -> dict:
        params = list(self.engine.module.named_parameters())
        out = {}
        if self.kind == "hp":
            self._relink()
            step = self._global_step()
            for name, p in params:
                out[name] = {"fp32": self._full_hp(p, None), **{k: self._full_hp(p, k) for k in keys}, "step": step}
            return out
        if self.kind == "z3":
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
            step = self._global_step()
            # On the host: the full state of every parameter would not fit beside a ZeRO-3 model's partitions.
            for name, p in params:
                fp32 = safe_get_full_fp32_param(p).detach().to("cpu", torch.float32, copy=True)
                moments = {}
                for k in keys:
                    try:
                        v = safe_get_full_optimizer_state(p, k)
                    except (KeyError, AttributeError):  # no step taken yet: Adam has no moments
                        v = None
                    moments[k] = v.detach().to("cpu", torch.float32, copy=True) if v is not None \
                        else torch.zeros_like(fp32)
                out[name] = {"fp32": fp32.view(p.ds_shape), **{k: v.view(p.ds_shape) for k, v in moments.items()},
                             "step": step}
            return out
        hp_of = self._hp_of(params)
        state = self.base.state
        for name, p in params:
            hp = hp_of[id(p)]
            st = state.get(hp, {})
            out[name] = {"fp32": hp.detach().float().clone(),
                         **{k: (st[k].detach().float().clone() if k in st else torch.zeros_like(hp, dtype=torch.float32))
                            for k in keys},
                         "step": _step_of(st)}
        return out

    def _hp_of(self, params) -> dict:
        if self.kind == "unfused":
            return {id(lp): hp for lg, hg in zip(self.opt.fp16_groups, self.opt.fp32_groups) for lp, hp in zip(lg, hg)}
        return {id(p): p for _, p in params}

    @torch.no_grad()
    def restore(self, entries: dict, keys) -> None:
        local = dict(self.engine.module.named_parameters())
        dev = self.engine.device
        if self.kind in ("hp", "z3"):
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
            base = self.base
            step = max(e["step"] for e in entries.values())
            if self.kind == "hp":
                flats = getattr(self.opt, "single_partition_of_fp32_groups", None)
                if flats is None:
                    flats = self.opt.fp32_groups_flat_partition
                for flat in flats:
                    base.state[flat] = {"step": _step_tensor(step), **{k: torch.zeros_like(flat) for k in keys}}
                self._relink()
            else:
                # Stage 3 hands the base optimizer its flat fp32 partitions only during step (param_groups are
                # empty in between); the state is keyed by those flats.
                for flat in self.opt.fp32_partitioned_groups_flat:
                    base.state[flat] = {"step": _step_tensor(step), **{k: torch.zeros_like(flat) for k in keys}}
            for name, p in local.items():
                e = entries[name]
                if self.kind == "hp":
                    p.data.copy_(e["fp32"].to(dev, p.dtype))
                safe_set_full_fp32_param(p, e["fp32"].to(dev))
                for k in keys:
                    safe_set_full_optimizer_state(p, e[k].to(dev), k)
            if self.kind == "z3":
                # The partitioned fp16/bf16/fp32 weights the forward reads follow the fp32 masters.
                for name, p in local.items():
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        p.data.copy_(entries[name]["fp32"].to(dev, p.dtype))
            return
        hp_of = self._hp_of(list(local.items()))
        state = self.base.state
        for name, p in local.items():
            e, hp = entries[name], hp_of[id(p)]
            hp.data.copy_(e["fp32"].to(hp.device, hp.dtype))
            p.data.copy_(e["fp32"].to(p.device, p.dtype))
            state[hp] = {"step": _step_tensor(e["step"]),
                         **{k: e[k].to(hp.device, hp.dtype).clone() for k in keys}}


def _step_tensor(step: float) -> torch.Tensor:
    # torch's AdamW keeps `step` on the host unless capturable/fused.
    return torch.tensor(float(step), dtype=torch.float32)
