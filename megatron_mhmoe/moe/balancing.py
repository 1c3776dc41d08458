"""The MoE balancing subsystem: every piece of balancing state that outlives one forward, and the per-step
reduction that updates it. The trainer only calls its hooks, without knowing any MoE field:

    balancing = MoEBalancing(model, ctx)
    balancing.begin_step()                         # before a step's first micro-batch
    balancing.after_backward(out.moe_stats)        # after each micro-batch's backward
    step = balancing.after_step(stats, micro_batches, applied, log)   # after the optimizer step
    balancing.metrics()                            # for the log line

State, per MoE layer (a LayerBalance the layer's forward reads):
- the global-batch loss's running counts of the step's earlier micro-batches (MoEConfig.global_aux_loss_coef):
  added after each backward, not in forward, so that a checkpointed block recomputes the same f^global;
- the routing bias (moe/bias_balancing.ExpertBias, a buffer in the layer's state dict so that checkpoints,
  resharding and export carry it), moved after each applied step by the sign rule (bias_update_rate,
  DeepSeek-V3) or set by quantile balancing (quantile_balancing, moe/quantile_balancing.py).

The per-step reduction is one all-reduce over DP for all layers: the (L, E) kept counts (global MaxVio of
the kept load), the (L, E) routed counts (MaxVio; the sign rule's counts) and, with quantile balancing,
the (L, E x bins) required-bias histograms. Each layer's forward already summed its statistics over the
TP ranks of its replica, so DP completes the global batch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from megatron_mhmoe.moe import metrics
from megatron_mhmoe.moe.bias_balancing import ExpertBias
from megatron_mhmoe.moe.quantile_balancing import bias_range, quantile_bias
from megatron_mhmoe.parallel import comm


class LayerBalance:
    """One MoE layer's balancing state (see the module docstring)."""

    def __init__(self, moe, bias: Optional[ExpertBias]):
        self.moe, self.bias = moe, bias
        self.earlier_counts: Optional[torch.Tensor] = None
        """(E,) balance counts of the step's earlier micro-batches (all DP replicas); None = first one."""
        self.earlier_sub_tokens = 0

    def bias_value(self) -> Optional[torch.Tensor]:
        return self.bias.value if self.bias is not None else None

    def begin_step(self) -> None:
        self.earlier_counts, self.earlier_sub_tokens = None, 0

    def add_global_counts(self, stats: metrics.MoEStats) -> None:
        """After a micro-batch's backward: its DP-wide counts join f^global of the step's later ones."""
        if stats.global_balance_counts is None:
            return
        c = stats.global_balance_counts.detach()
        self.earlier_counts = c if self.earlier_counts is None else self.earlier_counts + c
        self.earlier_sub_tokens += stats.global_sub_tokens

    @torch.no_grad()
    def update(self, routed: torch.Tensor, hist: Optional[torch.Tensor]) -> None:
        """After an applied step: (E,) the global batch's routed counts; (E x bins,) its histograms."""
        if self.bias is None:
            return
        if self.moe.quantile_balancing:
            lo, hi = bias_range(self.bias.value)  # the bias the step's forwards binned with
            new = quantile_bias(hist.view(self.moe.num_experts, -1), self.moe.top_k, lo, hi)
            self.bias.value.copy_(new.to(self.bias.value.device))
        else:
            self.bias.update(routed, self.moe.bias_update_rate)


class MoEBalancing:
    """All MoE layers' LayerBalance of a model, and the per-step reduction (module docstring)."""

    def __init__(self, model: nn.Module, ctx):
        self.ctx = ctx
        self.layers = [m.balance for m in model.modules() if isinstance(getattr(m, "balance", None), LayerBalance)]

    def begin_step(self) -> None:
        for lb in self.layers:
            lb.begin_step()

    def after_backward(self, moe_stats: Sequence[metrics.MoEStats]) -> None:
        for lb, st in zip(self.layers, moe_stats):
            lb.add_global_counts(st)

    def after_step(self, stats: Sequence[metrics.MoEStats], micro_batches: int, applied: bool,
                   log: bool = True) -> dict:
        """One all-reduce over DP of the step's (L, E) kept and routed counts (and histograms); the biases
        move only when the optimizer step was applied. Returns the step's counts for the metrics.

        log=False (a step the trainer does not log): the counts only the log line reads are left out, and
        without a bias to move nothing is reduced at all. Kept counts are left out while the stats have none
        (the layers' stats_mode 'off')."""
        none = {"step_kept": None, "step_selections": None}
        if not stats or not (log or any(lb.bias is not None for lb in self.layers)):
            return none
        L = len(stats) // micro_batches
        with_kept = log and stats[0].kept is not None
        parts = [metrics.step_kept_counts(stats, micro_batches)] if with_kept else []
        parts.append(metrics.step_selection_counts(stats, micro_batches))
        quantile = stats[0].quantile_hist is not None
        if quantile:
            parts.append(metrics.step_sum(stats, micro_batches, "quantile_hist"))  # (L, E x bins)
        E = parts[0].shape[1]
        both = comm.all_reduce_(torch.cat([p.reshape(L, -1) for p in parts], dim=1), self.ctx.dp_group)
        kept = both[:, :E] if with_kept else None
        routed = both[:, E:2 * E] if with_kept else both[:, :E]
        rest = 2 * E if with_kept else E  # where the histograms start
        if applied:
            for i, lb in enumerate(self.layers):
                lb.update(routed[i], both[i, rest:] if quantile else None)
        return {"step_kept": kept, "step_selections": routed if log else None}

    def metrics(self) -> dict:
        biases = [lb.bias.value for lb in self.layers if lb.bias is not None]
        if not biases:
            return {}
        # How far the bias has moved (max |b_e| over layers and experts).
        return {"moe/expert_bias_absmax": float(torch.stack(biases).abs().max())}
