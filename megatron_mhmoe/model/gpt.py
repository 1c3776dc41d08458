"""GPT-style pre-norm decoder whose FFN slots are dense MLPs or MH-MoE layers.

Single-device code that receives a ParallelContext:
- activations are [s, b, d] inside the model (Megatron layout; sequence parallelism splits dim 0),
  tokens/labels/logits are [b, s, ...] at the interface;
- without sequence parallelism the residual stream is replicated over TP; with it each TP rank holds
  s/TP tokens of it, [s/tp, b, d], and attention/MLP gather the sequence at their column-parallel input;
- logits stay split over the (padded) vocabulary and feed the vocab-parallel cross-entropy.

Dropout and tensor parallelism: without SP the residual stream is replicated over TP, so the dropout
masks applied to it must be equal on the TP ranks of a group. They are when the TP ranks share the
torch RNG state (seed by DP rank, not by global rank) and run the same random ops, which the dense
model does. Equivalence tests run with dropout 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from megatron_mhmoe.config import ModelConfig
from megatron_mhmoe.model.attention import SelfAttention, padded_attention
from megatron_mhmoe.model.mlp import build_ffn
from megatron_mhmoe.model.norms import build_norm
from megatron_mhmoe.model.rope import rotary_tables
from megatron_mhmoe.moe import sizing
from megatron_mhmoe.parallel import init as pinit
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.cross_entropy import masked_mean, vocab_parallel_cross_entropy
from megatron_mhmoe.parallel.params import is_expert, mark_tp_partial
from megatron_mhmoe.parallel.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding, parallel_lm_logits
from megatron_mhmoe.step_spans import span


@dataclass
class GPTOutput:
    """What GPTModel.forward returns. Losses are 0-dim tensors; `loss` is the one to backpropagate."""

    logits: Optional[torch.Tensor]
    """[b, s, V_local]: this TP rank's shard of the padded vocabulary (columns
    [tp_rank * V_local, (tp_rank + 1) * V_local); ids >= vocab_size are padding). None when labels
    were given and return_logits=False."""
    loss: Optional[torch.Tensor]
    """lm_loss + moe.aux_loss_coef * aux_loss + moe.z_loss_coef * z_loss (None without labels)."""
    lm_loss: Optional[torch.Tensor]
    """sum(token_loss * loss_mask) / sum(loss_mask) over this rank's micro-batch (None without labels)."""
    aux_loss: torch.Tensor
    """Load-balance loss summed over MoE layers (0 for a dense model)."""
    z_loss: torch.Tensor
    """Router z-loss summed over MoE layers (0 for a dense model)."""
    moe_stats: list = field(default_factory=list)
    """The stats object of each MoE layer, in layer order."""


class Embedding(nn.Module):
    """Vocab-parallel token embedding (+ learned absolute positions), then dropout.

    Output [s, b, d], or [s/tp, b, d] with sequence parallelism: the token lookup is reduce-scattered
    along s and this rank adds the position vectors of its own s/tp positions.
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.padded_vocab_size(ctx.tp_size), config.hidden_size, ctx,
            init_method=pinit.normal(config.init_std))
        if config.position_embedding == "learned":
            self.position_embeddings = nn.Parameter(torch.empty(config.max_seq_len, config.hidden_size))
            pinit.set_init(self.position_embeddings, pinit.normal(config.init_std))
            if ctx.sequence_parallel:
                # Each TP rank adds only its s/tp rows: partial gradients, summed over TP.
                mark_tp_partial(self.position_embeddings)
        else:
            self.register_parameter("position_embeddings", None)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, tokens_sb: torch.Tensor, position_offset: int = 0,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """positions (b, s): each token's own position (padded batches), instead of position_offset + i."""
        x = self.word_embeddings(tokens_sb)  # (s, b, d) or (s/tp, b, d)
        if self.position_embeddings is not None and positions is not None:
            x = x + self.position_embeddings[positions.t()]  # (s, b, d)
        elif self.position_embeddings is not None:
            s_local = x.shape[0]
            start = self.ctx.tp_rank * s_local if self.ctx.sequence_parallel else position_offset
            x = x + self.position_embeddings[start:start + s_local].unsqueeze(1)  # (s_local, 1, d)
        return self.dropout(x)


class TransformerBlock(nn.Module):
    """x = x + drop(attn(norm1(x))); y, stats = ffn(norm2(x)); x = x + drop(y)."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.norm1 = build_norm(config, ctx)
        self.attn = SelfAttention(config, ctx)
        self.norm2 = build_norm(config, ctx)
        self.ffn = build_ffn(config, ctx, layer_idx)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope=None, kv_cache=None, padding_mask=None):
        with span("attention"):
            x = x + self.dropout(self.attn(self.norm1(x), rope, kv_cache, self.layer_idx, padding_mask))
        with span("ffn"):
            y, stats = self.ffn(self.norm2(x))
            return x + self.dropout(y), stats


class GPTModel(nn.Module):
    """Decoder-only LM. `GPTModel(config, ctx)` is initialised (TP/EP-invariantly) from `seed`.

    Set `model.activation_checkpointing = True` to recompute each block in backward.
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext, seed: int = 1234):
        super().__init__()
        config.validate_for_parallel(ctx.tp_size, ctx.ep_size)
        self.config = config
        self.ctx = ctx
        self.activation_checkpointing = False
        self.embedding = Embedding(config, ctx)
        self.layers = nn.ModuleList([TransformerBlock(config, ctx, i) for i in range(config.num_layers)])
        self.final_norm = build_norm(config, ctx)
        if config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = ColumnParallelLinear(config.hidden_size, config.padded_vocab_size(ctx.tp_size), ctx,
                                                bias=False, init_method=pinit.normal(config.init_std), vocab=True)
        pinit.init_parameters(self, ctx, seed)

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None, return_logits: bool = False,
                kv_cache=None, attention_mask: Optional[torch.Tensor] = None) -> GPTOutput:
        """tokens, labels: [b, s] long; loss_mask: [b, s] float (1 = counts). See GPTOutput.

        kv_cache (model/kv_cache.KVCache, single process, inference): tokens are the positions after the
        cached ones; the cache is extended by them.
        attention_mask (single process, inference): [b, past + s], 1 = token, 0 = padding (transformers'
        convention, also over the cached positions): padding is masked out of attention and positions
        count real tokens only (attention.padded_attention), so a left-padded row equals its prompt alone.
        """
        b, s = tokens.shape
        cfg, ctx = self.config, self.ctx
        past = kv_cache.offset if kv_cache is not None else 0
        if kv_cache is not None and ctx.world_size > 1:
            raise ValueError("kv_cache is for single-process inference (export the model first)")
        if past + s > cfg.max_seq_len:
            raise ValueError(f"sequence length {past + s} > max_seq_len {cfg.max_seq_len}")
        if ctx.sequence_parallel and s % ctx.tp_size:
            raise ValueError(f"sequence parallelism splits the sequence over TP: length {s} is not "
                             f"divisible by tensor-parallel size {ctx.tp_size} ({s} % {ctx.tp_size} = "
                             f"{s % ctx.tp_size})")
        positions = padding_mask = None
        if attention_mask is not None:
            if ctx.world_size > 1:
                raise ValueError("attention_mask is for single-process inference (export the model first)")
            positions, padding_mask = padded_attention(attention_mask.to(tokens.device), s, past)
        rope = None
        if cfg.position_embedding == "rope":
            cos, sin = rotary_tables(past + s, cfg.head_dim, cfg.rope_theta, device=tokens.device)
            rope = (cos[past:], sin[past:])  # (s, hd/2): the new positions' angles
            if positions is not None:
                rope = (cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))  # (b, 1, s, hd/2)

        with span("embed_output"):
            x = self.embedding(tokens.t(), past, positions)  # (s, b, d) or (s/tp, b, d)
        moe_stats: list[Any] = []
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x, stats = checkpoint(layer, x, rope, use_reentrant=False)
            else:
                x, stats = layer(x, rope, kv_cache, padding_mask)
            if stats is not None:
                moe_stats.append(stats)
        if kv_cache is not None:
            kv_cache.advance(s)
        with span("embed_output"):
            x = self.final_norm(x)
            weight = self.embedding.word_embeddings.weight if self.lm_head is None else self.lm_head.weight
            logits = parallel_lm_logits(x, weight, ctx)  # (s, b, V_local)
        zero = logits.new_zeros((), dtype=torch.float32)
        aux = sum((st.aux_loss for st in moe_stats), zero)
        z = sum((st.z_loss for st in moe_stats), zero)
        lm_loss = loss = None
        if labels is not None:
            with span("embed_output"):
                token_loss = vocab_parallel_cross_entropy(logits, labels.t(), ctx, cfg.vocab_size)  # (s, b)
                lm_loss = masked_mean(token_loss, None if loss_mask is None else loss_mask.t())
            loss = lm_loss
            if cfg.moe is not None:
                loss = loss + cfg.moe.aux_loss_coef * aux + cfg.moe.z_loss_coef * z
                for coef, name in ((cfg.moe.seq_aux_loss_coef, "seq_aux_loss"),
                                   (cfg.moe.global_aux_loss_coef, "global_aux_loss")):
                    if coef != 0.0:
                        loss = loss + coef * sum((getattr(st, name) for st in moe_stats), zero)
        out_logits = logits.transpose(0, 1) if labels is None or return_logits else None  # (b, s, V_local)
        return GPTOutput(logits=out_logits, loss=loss, lm_loss=lm_loss, aux_loss=aux, z_loss=z,
                         moe_stats=moe_stats)

    # ------------------------------------------------------------------ accounting
    def num_params(self) -> dict[str, int]:
        """Parameter counts of the FULL model (as one process would hold it, vocab unpadded).

        Same numbers for every TP/EP layout: TP-split dims count TP times, expert stacks EP times,
        vocab dims count the true vocabulary (padding rows are never used). Tied weights count once.
        active_per_token: `sizing.active_params` applied to this module's own counts, so that the figure
        printed at start and `sizing.count_params(config)` follow one definition (non-expert parameters
        in full, plus the h*k expert slots of a token's sub-tokens; shared experts once per sub-token).
        """
        total = expert = shared = 0
        for p in self.parameters():  # deduplicated: a tied weight is one parameter
            n = 1
            for size in pinit.full_shape(p, self.ctx, self.config.vocab_size):
                n *= size
            total += n
            if is_expert(p):
                expert += n
            if getattr(p, "shared_expert", False):
                shared += n
        non_expert = total - expert
        active = sizing.active_params(self.config.moe, non_expert, expert, shared)
        return {"total": total, "expert": expert, "non_expert": non_expert, "active_per_token": active}
