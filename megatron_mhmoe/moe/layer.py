"""The MH-MoE FFN layer (Wu et al. 2024, arXiv 2404.15045). h=1 without projections is SMoE/X-MoE.

For the tokens x (N, d) a rank owns (its 1/TP share of a replica, or its sequence-parallel shard):
1. head projection x_hat = x W_head^T + b_head;
2. split token-major into h sub-tokens of width d/h (sub-token j of a token is columns [j d/h, (j+1) d/h));
3. route every sub-token (fp32), top-k, capacity (decided on the whole replica);
4. dispatch to the experts (all-to-all over EP), combine with the gate weights; shared experts, when
   configured, add their output on every sub-token (gate 1, no routing, no all-to-all);
5. merge the h sub-tokens back into a token and apply the merge projection.
The block around it adds the residual; the layer has none of its own.

A call with no tokens (x of shape (0, b, d) or (s, 0, d)) is allowed rather than refused: it returns an
empty output, aux and z losses of exactly 0 that still carry a (zero) gradient, and all-zero counts, so
an empty batch neither raises nor puts NaN into the loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from megatron_mhmoe.config import ModelConfig
from megatron_mhmoe.moe import capacity as cap
from megatron_mhmoe.moe.balancing import LayerBalance
from megatron_mhmoe.moe.bias_balancing import ExpertBias
from megatron_mhmoe.moe.dispatcher import MoEDispatcher
from megatron_mhmoe.moe.experts import GroupedExperts
from megatron_mhmoe.moe.fixed_counts import fixed_bincount
from megatron_mhmoe.moe.losses import global_balance_loss, load_balance_loss, sequence_balance_loss
from megatron_mhmoe.moe.metrics import MoEStats, divergence_histogram
from megatron_mhmoe.moe.router import SigmoidGate, SoftmaxGate, XMoEGate, choose
from megatron_mhmoe.moe.routing import RoutingRecord, build_record
from megatron_mhmoe.moe import routing_stats
from megatron_mhmoe.moe.shared_experts import SharedExperts
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.init import init_parameters, normal, scaled_normal, set_init, xavier_uniform, zeros
from megatron_mhmoe.parallel.params import mark_tp_partial
from megatron_mhmoe.step_spans import span

STATS_MODES = ("eager", "deferred", "off")


class MHMoELayer(nn.Module):
    def __init__(self, config: ModelConfig, ctx: ParallelContext, layer_idx: int = 0):
        super().__init__()
        moe = config.moe
        if moe is None:
            raise ValueError("MHMoELayer needs config.moe (an MoEConfig); got a dense config")
        config.validate_for_parallel(ctx.tp_size, ctx.ep_size)
        self.config, self.moe, self.ctx, self.layer_idx = config, moe, ctx, layer_idx
        d, h = config.hidden_size, moe.num_heads
        self.d_sub = d // h
        self.dispatcher = MoEDispatcher(ctx, moe.num_experts, moe)
        if moe.head_projection:
            self.head = nn.Linear(d, d)
            self.merge = nn.Linear(d, d)
            set_init(self.head.weight, xavier_uniform(1.0 / math.sqrt(2.0)))
            set_init(self.merge.weight, xavier_uniform(1.0))
            set_init(self.head.bias, zeros())
            set_init(self.merge.bias, zeros())
        else:
            self.head = self.merge = None
        if moe.gate == "xmoe":
            self.router = XMoEGate(self.d_sub, moe.num_experts, moe.gate_dim, moe.gate_temperature, config.init_std)
        elif moe.gate == "sigmoid":
            self.router = SigmoidGate(self.d_sub, moe.num_experts, config.init_std)
        else:
            self.router = SoftmaxGate(self.d_sub, moe.num_experts, config.init_std)
        self.experts = GroupedExperts(
            self.dispatcher.num_local_experts, self.d_sub, moe.expert_hidden_size, moe.expert_activation, ctx,
            normal(config.init_std), scaled_normal(config.init_std, config.num_layers))
        # Always-on experts on every sub-token (moe/shared_experts.py: why sub-token); replicated, no all-to-all.
        self.shared_experts = SharedExperts(
            moe.num_shared_experts, self.d_sub, moe.shared_expert_hidden_size or moe.expert_hidden_size,
            moe.expert_activation, normal(config.init_std), scaled_normal(config.init_std, config.num_layers)) \
            if moe.num_shared_experts else None
        # Each TP rank feeds these with other tokens (its share), so their grads are summed over TP.
        for name, p in self.named_parameters():
            if not name.startswith("experts."):
                mark_tp_partial(p)
        uses_bias = moe.bias_update_rate > 0 or moe.quantile_balancing
        self.expert_bias = ExpertBias(moe.num_experts) if uses_bias else None
        """The routing bias of aux-loss-free or quantile balancing (a buffer in the state dict); None without."""
        self.balance = LayerBalance(moe, self.expert_bias)
        """Balancing state that outlives a forward (moe/balancing.py; updated by MoEBalancing's hooks)."""
        self.stats_mode = "eager"
        """When the routing statistics are computed and summed: 'eager' (in the forward, the reference),
        'deferred' (local on the device, summed by routing_stats.reduce_pending) or 'off' (moe/routing_stats.py)."""
        self._init_local()

    def _bias(self) -> torch.Tensor | None:
        return self.balance.bias_value()

    def _init_local(self) -> None:
        """Initialise from the same full tensors whatever TP/EP (the model re-inits with its own seed)."""
        init_parameters(self, self.ctx, seed=1234 + self.layer_idx)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        """x: (s, b, d) replicated over TP, or (s/TP, b, d) with sequence parallelism -> same shape."""
        moe, disp = self.moe, self.dispatcher
        shape = x.shape
        d, h, k, E = shape[-1], moe.num_heads, moe.top_k, moe.num_experts
        tokens = disp.split_tokens(x.reshape(-1, d))  # (n, d): this rank's share of the replica
        n = tokens.shape[0]
        # 1.
        with span("moe/projection"):
            x_hat = self.head(tokens) if self.head is not None else tokens  # (n, d)
        # 2. token-major: the h sub-tokens of a token are adjacent rows.
        x_sub = x_hat.reshape(n * h, self.d_sub)  # (n*h, d/h)
        # 3.
        tp_shards = self.ctx.tp_size  # the replica's tokens are split over TP (a share each, or SP shards)
        tp_rank = self.ctx.tp_rank if tp_shards > 1 else 0
        S = n * h * tp_shards  # sub-tokens in the routing group (the replica)
        with span("moe/router"):
            logits = self.router(x_sub)  # (n*h, E) fp32
            choice = choose(logits, moe, first_index=tp_rank * n * h, bias=self._bias(),
                            head_groups=disp.head_groups)
        with span("moe/permute"):
            capacity = cap.expert_capacity(moe.capacity_factor, k, S, E)
            rec = build_record(choice, E, capacity, disp, tp_rank)
        # 4.
        with span("moe/dispatcher"):
            y_sub = disp.dispatch(x_sub, rec, self.experts)  # (n*h, d/h)
        if self.shared_experts is not None:  # gate weight 1, never dropped, joins before the merge
            with span("moe/experts"):
                y_sub = y_sub + self.shared_experts(x_sub)
        # 5.
        y = y_sub.reshape(n, d)  # (n, d)
        if self.merge is not None:
            with span("moe/projection"):
                y = self.merge(y)
        with span("moe/dispatch"):
            y = disp.gather_tokens(y).reshape(shape)
        # This rank holds rows tp_rank*n .. of the replica's s-major (s, b) rows (TP share or SP shard), so a
        # token's sequence is its replica row mod b: the sequence-wise loss counts whole sequences over TP.
        seq = (torch.arange(n, device=x.device) + tp_rank * n) % shape[1] if n else None  # (n,)
        seq_len = shape[0] * tp_shards if self.ctx.sequence_parallel else shape[0]  # SP holds s/TP of each sequence
        return y, self._stats(rec, S, n * tp_shards, seq, shape[1], seq_len)

    def _balance_choices(self, choice) -> tuple[torch.Tensor, int]:
        """(S, c) the expert ids the balance losses count per sub-token, and c (what f divides by):
        MoEConfig.balance_counting (moe/losses.py)."""
        if self.moe.balance_counting == "first_choice":
            return choice.experts[:, :1], 1
        ids = choice.unbiased_experts if choice.unbiased_experts is not None else choice.experts
        return ids, ids.shape[1]

    def _stats(self, rec: RoutingRecord, S: int, num_tokens: int, seq: torch.Tensor | None, num_seqs: int,
               seq_len: int) -> MoEStats:
        if self.stats_mode not in STATS_MODES:
            raise ValueError(f"MHMoELayer.stats_mode is {self.stats_mode!r}: use one of {STATS_MODES}")
        balance_ids, choices = self._balance_choices(rec.choice)  # (S_local, c)
        with span("moe/statistics"), torch.no_grad():
            if self.stats_mode == "eager":
                balance, quantile_hist, routing = self._eager_counts(rec, balance_ids)
            else:
                balance, quantile_hist = self._training_counts(rec, balance_ids)
                routing = dict.fromkeys(routing_stats.FIELDS)
                if self.stats_mode == "deferred":
                    routing["local_routing"] = routing_stats.local_statistics(
                        rec, self.moe.num_experts, self.moe.num_heads, self.moe.route_groups,
                        self.dispatcher.num_local_experts)
        with span("moe/losses"):
            return self._losses(rec, S, num_tokens, seq, num_seqs, seq_len, balance_ids, choices, balance,
                                quantile_hist, routing)

    def _training_counts(self, rec: RoutingRecord, balance_ids: torch.Tensor):
        """What training needs from every forward, summed over the replica in one exchange: (E,) balance
        counts and, with quantile balancing, the (E x bins,) required-bias histograms."""
        moe, E = self.moe, self.moe.num_experts
        parts = [routing_stats.counts(balance_ids.reshape(-1), E)]
        if moe.quantile_balancing:  # an empty forward (or debug routing) bins nothing
            hist = rec.choice.required_bias_hist
            parts.append(hist if hist is not None else parts[0].new_zeros(E * moe.quantile_bins))
        both = self.dispatcher.replica_sum_stats(torch.cat(parts))
        return both[:E], (both[E:] if moe.quantile_balancing else None)

    def _eager_counts(self, rec: RoutingRecord, balance_ids: torch.Tensor):
        """stats_mode 'eager' (the reference for 'deferred'): the training counts and the routing statistics,
        summed over the replica in the forward, in one exchange per forward."""
        disp, moe, E, h = self.dispatcher, self.moe, self.moe.num_experts, self.moe.num_heads
        choice, keep = rec.choice, rec.keep
        e_flat = rec.flat_experts
        kept_local = fixed_bincount(e_flat, E, keep)  # (E,) the kept assignments (all when dropless)
        div_local = divergence_histogram(choice.experts, h)
        # Fan-out: distinct expert groups and EP ranks a token's h*k choices reach (before capacity).
        groups_local = divergence_histogram(choice.experts // (E // moe.route_groups), h)
        ranks_local = divergence_histogram(choice.experts // disp.num_local_experts, h)
        # Sub-token i (token-major) is head i mod h; every one of its k choices counts.
        n_sub = choice.experts.shape[0]
        head = (torch.arange(n_sub, device=e_flat.device) % h).repeat_interleave(choice.experts.shape[1])
        head_local = fixed_bincount(head * E + choice.experts.reshape(-1), h * E)
        # The balance counts ride on the same exchange (no extra collective with a bias or group limit).
        balance_local = fixed_bincount(balance_ids, E)
        parts = [kept_local, div_local, groups_local, ranks_local, head_local, balance_local]
        if moe.quantile_balancing:  # an empty forward (or debug routing) bins nothing
            hist = choice.required_bias_hist
            parts.append(hist if hist is not None else kept_local.new_zeros(E * moe.quantile_bins))
        both = disp.replica_sum_stats(torch.cat(parts))
        nd = div_local.numel()
        routing = {"kept": both[:E], "divergence": both[E:E + nd], "fanout_groups": both[E + nd:E + 2 * nd],
                   "fanout_ranks": both[E + 2 * nd:E + 3 * nd],
                   "head_counts": both[E + 3 * nd:E + 3 * nd + h * E].view(h, E)}
        balance = both[E + 3 * nd + h * E:E + 3 * nd + h * E + E]  # (E,) over the replica
        quantile_hist = both[E + 3 * nd + h * E + E:] if moe.quantile_balancing else None
        return balance, quantile_hist, routing

    def _losses(self, rec: RoutingRecord, S: int, num_tokens: int, seq: torch.Tensor | None, num_seqs: int,
                seq_len: int, balance_ids: torch.Tensor, choices: int, balance: torch.Tensor,
                quantile_hist: torch.Tensor | None, routing: dict) -> MoEStats:
        disp, moe, E, h = self.dispatcher, self.moe, self.moe.num_experts, self.moe.num_heads
        choice, counts_all = rec.choice, rec.counts_all
        # No sub-tokens: the sums below are all zero, and 0 / 1 keeps the losses at 0 instead of 0 / 0 = NaN.
        per = max(S, 1)
        prob_sum = disp.replica_sum(choice.probs.sum(0))  # (E,) over the replica, differentiable
        aux = load_balance_loss(prob_sum, balance, per, choices)
        z = disp.replica_sum(choice.lse.square().sum()) / per  # ST-MoE z-loss: mean logsumexp(logits)^2, lse from top_k
        zero = prob_sum.sum() * 0.0  # keeps a (zero) gradient path when a loss is off
        seq_aux = global_aux = zero
        global_counts, global_S = None, 0
        if moe.seq_aux_loss_coef != 0.0:
            # A sequence's tokens lie on every TP rank of the replica (TP share or SP shard): sum over TP.
            sub_seq = seq.repeat_interleave(h) if seq is not None else choice.probs.new_zeros(0, dtype=torch.long)
            p_seq = choice.probs.new_zeros(num_seqs, E).index_add(0, sub_seq, choice.probs)
            with torch.no_grad():
                c_seq = torch.zeros(num_seqs * E, dtype=torch.long, device=choice.probs.device)
                idx = (sub_seq[:, None] * E + balance_ids).reshape(-1)  # (S_local * c,)
                c_seq.index_add_(0, idx, torch.ones_like(idx))
                c_seq = disp.replica_sum_stats(c_seq).view(num_seqs, E)
            seq_aux = sequence_balance_loss(disp.replica_sum(p_seq), c_seq, seq_len * h, choices)
        if moe.global_aux_loss_coef != 0.0:
            with torch.no_grad():
                both_dp = torch.cat([balance.double(), balance.new_full((1,), S).double()])
                both_dp = comm.all_reduce_(both_dp, self.ctx.dp_group)  # the replica's counts already span TP
                global_counts, global_S = both_dp[:E], int(both_dp[E])
                earlier = self.balance.earlier_counts
                f_counts = global_counts if earlier is None else global_counts + earlier
            global_aux = global_balance_loss(prob_sum, S, f_counts, global_S + self.balance.earlier_sub_tokens,
                                             choices)
        return MoEStats(aux_loss=aux, z_loss=z, selections=counts_all.sum((0, 1)), num_tokens=num_tokens,
                        num_sub_tokens=S,
                        seq_aux_loss=seq_aux, global_aux_loss=global_aux, prob_sum=prob_sum,
                        balance_counts=balance, balance_choices=choices,
                        global_balance_counts=global_counts, global_sub_tokens=global_S,
                        quantile_hist=quantile_hist, **routing)

    # ------------------------------------------------------------------ slow reference (tests)
    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Single-process (TP=EP=1) output by the obvious loops: no sorting, no dispatcher."""
        assert self.ctx.world_size == 1, "the reference runs on one process"
        moe = self.moe
        d = x.shape[-1]
        tokens = x.reshape(-1, d)
        x_hat = self.head(tokens) if self.head is not None else tokens
        x_sub = x_hat.reshape(-1, self.d_sub)
        choice = choose(self.router(x_sub), moe, bias=self._bias(), head_groups=self.dispatcher.head_groups)
        ids = choice.experts.clone()
        capacity = cap.expert_capacity(moe.capacity_factor, moe.top_k, x_sub.shape[0], moe.num_experts)
        if capacity > 0:
            keep = cap.capacity_keep_reference(choice.experts, moe.num_experts, capacity)  # (S, k)
            ids[~keep] = -1
        y_sub = self.experts.forward_reference(x_sub, ids, choice.gates)
        if self.shared_experts is not None:
            y_sub = y_sub + self.shared_experts.forward_reference(x_sub)
        y = y_sub.reshape(-1, d)
        if self.merge is not None:
            y = self.merge(y)
        return y.reshape(x.shape)
