"""Every size-validation ValueError: config.validate, validate_for_parallel, layout.validate_sizes,
ParallelContext.from_world and the TP layers (comm.split: test_comm.py). Messages must carry the arithmetic."""
from __future__ import annotations

import dataclasses
import re

import pytest

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.parallel import layout as L
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

BASE = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128)
MOE = MoEConfig(num_experts=8, top_k=2, num_heads=4, expert_hidden_size=32, moe_every=2)


def raises(match: str):
    return pytest.raises(ValueError, match=re.escape(match))


def test_valid_configs_pass():
    BASE.validate()
    dataclasses.replace(BASE, moe=MOE).validate_for_parallel(tp_size=4, ep_size=8)


@pytest.mark.parametrize("field,value,message", [
    ("activation", "relu", "activation='relu' is not one of ['gelu', 'swiglu']"),
    ("norm", "batchnorm", "norm='batchnorm' is not one of ['layernorm', 'rmsnorm']"),
    ("position_embedding", "alibi", "position_embedding='alibi' is not one of ['learned', 'rope']"),
    ("vocab_size", 0, "vocab_size=0 must be >= 1"),
    ("hidden_size", 0, "hidden_size=0 must be >= 1"),
    ("num_layers", 0, "num_layers=0 must be >= 1"),
    ("num_attention_heads", 0, "num_attention_heads=0 must be >= 1"),
    ("ffn_hidden_size", 0, "ffn_hidden_size=0 must be >= 1"),
    ("max_seq_len", 0, "max_seq_len=0 must be >= 1"),
    ("make_vocab_divisible_by", 0, "make_vocab_divisible_by=0 must be >= 1"),
    ("num_attention_heads", 6, "hidden_size 64 is not divisible by num_attention_heads 6 (64 % 6 = 4)"),
    ("dropout", 1.0, "dropout=1.0 must be in [0, 1)"),
])
def test_model_config_validate(field, value, message):
    with raises(message):
        dataclasses.replace(BASE, **{field: value}).validate()


def test_rope_needs_even_head_dim():
    with raises("RoPE needs an even head_dim; hidden_size/heads = 3"):
        dataclasses.replace(BASE, hidden_size=12, num_attention_heads=4, position_embedding="rope").validate()


@pytest.mark.parametrize("field,value,message", [
    ("gate", "hash", "moe.gate='hash' is not one of ['xmoe', 'softmax', 'sigmoid']"),
    ("expert_activation", "relu", "moe.expert_activation='relu' is not one of ['gelu', 'swiglu']"),
    ("num_experts", 0, "moe.num_experts=0 must be >= 1"),
    ("top_k", 0, "moe.top_k=0 must be in [1, num_experts=8]"),
    ("top_k", 9, "moe.top_k=9 must be in [1, num_experts=8]"),
    ("num_heads", 3, "moe.num_heads 3 does not divide hidden_size 64 (64 % 3 = 1)"),
    ("num_heads", 0, "moe.num_heads 0 does not divide hidden_size 64 (64 % 0 = n/a)"),
    ("expert_hidden_size", 0, "moe.expert_hidden_size=0 and moe.gate_dim=16 must be >= 1"),
    ("gate_dim", 0, "moe.expert_hidden_size=32 and moe.gate_dim=0 must be >= 1"),
    ("gate_temperature", 0.0, "moe.gate_temperature=0.0 must be > 0"),
    ("moe_every", 0, "moe.moe_every=0 must be in [1, num_layers=2]"),
    ("moe_every", 3, "moe.moe_every=3 must be in [1, num_layers=2]"),
])
def test_moe_config_validate(field, value, message):
    with raises(message):
        dataclasses.replace(BASE, moe=dataclasses.replace(MOE, **{field: value})).validate()


@pytest.mark.parametrize("cfg,tp,ep,message", [
    (BASE, 3, 1, "num_attention_heads 4 is not divisible by tensor-parallel size 3 (4 % 3 = 1)"),
    (dataclasses.replace(BASE, ffn_hidden_size=130), 4, 1,
     "ffn_hidden_size 130 is not divisible by tensor-parallel size 4 (130 % 4 = 2)"),
    (dataclasses.replace(BASE, moe=MOE), 1, 3,
     "num_experts 8 is not divisible by expert-parallel size 3 (8 % 3 = 2); each EP rank holds "
     "num_experts / ep_size experts: pick an EP from [1, 2, 4, 8]"),
])
def test_validate_for_parallel(cfg, tp, ep, message):
    with raises(message):
        cfg.validate_for_parallel(tp, ep)


def test_validate_for_parallel_validates_the_model_first():
    with raises("norm='x'"):
        dataclasses.replace(BASE, norm="x").validate_for_parallel(1, 1)


@pytest.mark.parametrize("world,tp,ep,message", [
    (0, 1, 1, "world_size=0, tp_size=1, ep_size=1: all must be >= 1"),
    (4, 0, 1, "world_size=4, tp_size=0, ep_size=1: all must be >= 1"),
    (4, 1, 0, "world_size=4, tp_size=1, ep_size=0: all must be >= 1"),
    (6, 4, 1, "tensor-parallel size 4 does not divide world size 6 (6 % 4 = 2); world = TP x DP, so choose "
              "a TP from the divisors of 6: [1, 2, 3, 6]"),
    (8, 2, 3, "expert-parallel size 3 does not divide world size 8 (8 % 3 = 2); world = EP x EDP, so choose "
              "an EP from the divisors of 8: [1, 2, 4, 8]"),
])
def test_layout_validate_sizes(world, tp, ep, message):
    with raises(message):
        L.validate_sizes(world, tp, ep)
    with raises(message):
        L.describe(world, tp, ep)


def test_from_world_without_distributed():
    with raises("tp_size=2, ep_size=1 need torch.distributed: initialise it first"):
        ParallelContext.from_world(tp_size=2)


def test_tp_layer_sizes():
    ctx = ParallelContext(coords=L.RankLayout(rank=0, world_size=4, tp_size=4, ep_size=1))
    with raises("column-parallel out_features 10 is not divisible by tensor-parallel size 4 (10 % 4 = 2)"):
        ColumnParallelLinear(8, 10, ctx)
    with raises("row-parallel in_features 6 is not divisible by tensor-parallel size 4 (6 % 4 = 2)"):
        RowParallelLinear(6, 8, ctx)
    with raises("padded vocabulary 256 < vocabulary 300"):
        VocabParallelEmbedding(300, 256, 8, ctx)
    with raises("padded vocabulary 514 is not divisible by tensor-parallel size 4 (514 % 4 = 2)"):
        VocabParallelEmbedding(300, 514, 8, ctx)
