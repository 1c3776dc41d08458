"""Shared experts through the checkpoint tools: the `mhmoe` HF export carries them (transformers' logits
equal the model's, and they change when the shared experts are zeroed), the GPT-2 export refuses the model,
and the offline reshard metadata treats them as replicated, TP-partial, non-expert tensors."""
from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_mhmoe.export.huggingface import export_hf
from megatron_mhmoe.runtime.checkpoint import CheckpointError

pytest.importorskip("transformers")


def _shared_export(folder: str, zero_shared: bool = False):
    """A fresh model with one shared expert per MoE layer in tools/export_checkpoint.py's format."""
    from safetensors.torch import save_file

    from megatron_mhmoe.config import ModelConfig, MoEConfig, to_dict
    from megatron_mhmoe.model.gpt import GPTModel
    from megatron_mhmoe.parallel.context import ParallelContext
    cfg = ModelConfig(vocab_size=257, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                      max_seq_len=64, moe=MoEConfig(num_experts=4, top_k=2, num_heads=2, expert_hidden_size=16,
                                                    num_shared_experts=1, shared_expert_hidden_size=24))
    model = GPTModel(cfg, ParallelContext.single_process(), seed=5).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "shared_experts." in name:
                p.mul_(0.0) if zero_shared else p.add_(0.5 * torch.randn_like(p))
    full = {k: (v[:cfg.vocab_size] if k.endswith("word_embeddings.weight") else v).contiguous()
            for k, v in model.state_dict().items()}
    assert any("shared_experts.w1" in k for k in full)
    os.makedirs(folder)
    save_file(full, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model": to_dict(cfg), "step": 0, "tokenizer": {"type": "byte"}}, f)
    return model, cfg


def test_mhmoe_export_carries_the_shared_experts(tmp_path):
    from transformers import AutoModelForCausalLM
    tokens = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for zero in (False, True):
        ours, hf = str(tmp_path / f"ours{zero}"), str(tmp_path / f"hf{zero}")
        model, _ = _shared_export(ours, zero_shared=zero)
        with torch.no_grad():
            want = model(tokens).logits
        export_hf(ours, hf, log=lambda m: None)
        with open(os.path.join(hf, "config.json")) as f:
            assert json.load(f)["mhmoe_model"]["moe"]["num_shared_experts"] == 1
        loaded = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
        with torch.no_grad():
            got = loaded(tokens).logits
        torch.testing.assert_close(got, want[..., :257] if want.shape[-1] != got.shape[-1] else want,
                                   atol=1e-5, rtol=1e-5)
        logits[zero] = got
    assert (logits[False] - logits[True]).abs().max() > 1e-3  # the shared experts are in the exported logits


def test_gpt2_export_refuses_the_shared_expert_model(tmp_path):
    ours = str(tmp_path / "ours")
    _shared_export(ours)
    with pytest.raises(CheckpointError, match="does not map exactly onto GPT-2: it has MoE layers"):
        export_hf(ours, str(tmp_path / "gpt2"), fmt="gpt2", log=lambda m: None)
    assert sorted(os.listdir(tmp_path)) == ["ours"]  # no output folder, no temporary left behind


def test_reshard_metadata_replicates_the_shared_experts():
    """The offline tools see shared experts as replicated (no TP dim, not expert) TP-partial tensors: every
    rank of a TP=2 x EP=2 layout holds the full tensor and the gather gives it back."""
    from megatron_mhmoe.model.gpt import GPTModel
    from megatron_mhmoe.parallel.context import ParallelContext
    from megatron_mhmoe.parallel.layout import RankLayout
    from megatron_mhmoe.checkpoint import consolidate as C
    from megatron_mhmoe.runtime.universal import param_meta
    from megatron_mhmoe.config import ModelConfig, MoEConfig
    cfg = ModelConfig(vocab_size=257, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                      max_seq_len=64, moe=MoEConfig(num_experts=4, top_k=2, num_heads=2, expert_hidden_size=16,
                                                    num_shared_experts=2, expert_activation="swiglu"))
    model = GPTModel(cfg, ParallelContext.single_process(), seed=5)
    meta = param_meta(model)
    shared = {n: m for n, m in meta.items() if "shared_experts." in n}
    assert len(shared) == 3  # w1, w2, w3 of the one MoE layer
    for name, m in shared.items():
        assert m["tp_dim"] is None and not m["expert"] and m["tp_partial"], (name, m)
        full = dict(model.named_parameters())[name].detach()
        layouts = [RankLayout(r, 4, 2, 2) for r in range(4)]
        pieces = {}
        for lay in layouts:
            piece = C.shard_tensor(full, m, lay, cfg.padded_vocab_size(2))
            torch.testing.assert_close(piece, full, rtol=0, atol=0)
            pieces[(lay.tp_rank, lay.ep_rank)] = piece
        torch.testing.assert_close(C._gather(pieces, m, 2, 2, cfg.vocab_size), full, rtol=0, atol=0)
