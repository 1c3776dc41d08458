"""Incremental decoding with the KV cache (model/kv_cache.py) equals recomputing the whole window.

For each model kind (dense with learned positions, MH-MoE h=4 with RoPE and RMSNorm, SMoE h=1 with the
softmax gate, all dropless): the logits of every step equal the uncached forward's within 1e-5 (fp32;
attention over a cached prefix sums in another order), greedy tokens are identical over 40 steps, also
past max_seq_len where the cache restarts on the last window, and a multi-token chunk fed after a cached
prefix is masked causally. A left-padded batch with its attention mask gives, at every real position, the
logits of each prompt alone within 1e-5, in one forward and step by step through the cache, and
generate_batch (megatron_mhmoe/evaluation/generate.py, what tools/generate.py runs) gives each prompt's own
tokens, also past max_seq_len.
"""
from __future__ import annotations


import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.evaluation import generate as gen
from megatron_mhmoe.model.gpt import GPTModel
from megatron_mhmoe.model.kv_cache import KVCache
from megatron_mhmoe.parallel.context import ParallelContext


KINDS = {
    "dense_learned": ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4,
                                 ffn_hidden_size=64, max_seq_len=24),
    "mhmoe_rope": ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                              max_seq_len=24, position_embedding="rope", norm="rmsnorm",
                              moe=MoEConfig(num_experts=4, top_k=2, num_heads=4, expert_hidden_size=16, moe_every=1,
                                            capacity_factor=0.0)),
    "smoe_softmax": ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4,
                                ffn_hidden_size=64, max_seq_len=24,
                                moe=MoEConfig(num_experts=4, top_k=1, num_heads=1, head_projection=False,
                                              gate="softmax", expert_hidden_size=16, capacity_factor=0.0)),
}


def _model(kind: str) -> GPTModel:
    model = GPTModel(KINDS[kind], ParallelContext.single_process(), seed=3)
    return model.eval()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cached_logits_equal_full_forward(kind):
    model = _model(kind)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits  # (2, 20, V)
        cache = KVCache(model.config.num_layers)
        steps = [model(ids[:, :5], kv_cache=cache).logits]  # a prompt chunk
        steps += [model(ids[:, t:t + 1], kv_cache=cache).logits for t in range(5, 12)]  # one token at a time
        steps.append(model(ids[:, 12:20], kv_cache=cache).logits)  # a chunk after a cached prefix
    cached = torch.cat(steps, dim=1)
    assert cache.offset == 20
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_greedy_tokens_equal_with_and_without_cache(kind):
    model = _model(kind)
    prompt = [5, 17, 3]
    slow = gen.generate(model, prompt, 40, greedy=True, use_cache=False)  # 43 > max_seq_len 24: the window slides
    fast = gen.generate(model, prompt, 40, greedy=True, use_cache=True)
    assert fast == slow and len(fast) == 40


def test_cache_refuses_more_than_max_seq_len():
    model = _model("dense_learned")
    cache = KVCache(model.config.num_layers)
    with torch.no_grad():
        model(torch.zeros(1, 20, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="sequence length 25 > max_seq_len 24"):
            model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_left_padded_batch_equals_each_prompt_alone(kind):
    model = _model(kind)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 11, 7)]
    W, steps = 11, 6
    ids = torch.tensor([[0] * (W - len(p)) + p for p in prompts])  # (3, W) left-padded with token 0
    mask = torch.tensor([[0] * (W - len(p)) + [1] * len(p) for p in prompts])
    cont = torch.randint(0, 97, (3, steps), generator=g)  # the same continuation fed to every row
    with torch.no_grad():
        full = model(torch.cat([ids, cont], 1), attention_mask=torch.cat([mask, torch.ones_like(cont)], 1)).logits
        cache = KVCache(model.config.num_layers)
        cached = [model(ids, kv_cache=cache, attention_mask=mask).logits]
        for t in range(steps):
            m = torch.cat([mask, torch.ones(3, t + 1, dtype=torch.long)], 1)
            cached.append(model(cont[:, t:t + 1], kv_cache=cache, attention_mask=m).logits)
        cached = torch.cat(cached, 1)
        for i, p in enumerate(prompts):
            alone = model(torch.cat([torch.tensor([p]), cont[i:i + 1]], 1)).logits[0]  # (len + steps, V)
            torch.testing.assert_close(full[i, W - len(p):], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cached[i, W - len(p):], alone, atol=1e-5, rtol=1e-5)
    batch = gen.generate_batch(model, prompts[:2], 14, greedy=True)  # 11 + 14 > max_seq_len 24: the window slides
    assert batch == [gen.generate(model, p, 14, greedy=True) for p in prompts[:2]]
