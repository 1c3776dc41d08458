"""Dense models with learned positions, LayerNorm and a GELU MLP as a plain GPT-2 checkpoint (GPT2LMHeadModel,
no remote code): the weights renamed and transposed into GPT-2's layout, and its config. Anything else is
refused with the reasons (gpt2_refusal); export_hf(fmt="gpt2") is the entry point."""
from __future__ import annotations

import os

from megatron_mhmoe.runtime.checkpoint import CheckpointError


def gpt2_refusal(mcfg) -> list[str]:
    """Why a model does not map exactly onto GPT-2 (empty: it does)."""
    why = []
    if mcfg.moe is not None:
        why.append("it has MoE layers (GPT-2 has dense MLPs only; use --format mhmoe)")
    if mcfg.position_embedding != "learned":
        why.append(f"position_embedding={mcfg.position_embedding} (GPT-2 learns absolute positions)")
    if mcfg.norm != "layernorm":
        why.append(f"norm={mcfg.norm} (GPT-2 uses LayerNorm)")
    if mcfg.activation != "gelu":
        why.append(f"activation={mcfg.activation} (GPT-2's MLP is GELU)")
    return why


def gpt2_state_dict(full: dict, mcfg) -> dict:
    """Our full (single-process, unpadded) state dict in GPT2LMHeadModel's names and layouts."""
    d, nh = mcfg.hidden_size, mcfg.num_attention_heads
    hd = d // nh
    out = {"transformer.wte.weight": full["embedding.word_embeddings.weight"],
           "transformer.wpe.weight": full["embedding.position_embeddings"],
           "transformer.ln_f.weight": full["final_norm.weight"], "transformer.ln_f.bias": full["final_norm.bias"]}
    for i in range(mcfg.num_layers):
        src, dst = f"layers.{i}.", f"transformer.h.{i}."
        # Ours: fused QKV output laid out head-major [nh, 3, hd]; GPT-2's c_attn: [3, nh, hd], Conv1D (in, out).
        w = full[src + "attn.qkv.weight"].view(nh, 3, hd, d).permute(1, 0, 2, 3).reshape(3 * d, d)
        b = full[src + "attn.qkv.bias"].view(nh, 3, hd).permute(1, 0, 2).reshape(3 * d)
        out.update({
            dst + "ln_1.weight": full[src + "norm1.weight"], dst + "ln_1.bias": full[src + "norm1.bias"],
            dst + "attn.c_attn.weight": w.t(), dst + "attn.c_attn.bias": b,
            dst + "attn.c_proj.weight": full[src + "attn.proj.weight"].t(),
            dst + "attn.c_proj.bias": full[src + "attn.proj.bias"],
            dst + "ln_2.weight": full[src + "norm2.weight"], dst + "ln_2.bias": full[src + "norm2.bias"],
            dst + "mlp.c_fc.weight": full[src + "ffn.fc1.weight"].t(),
            dst + "mlp.c_fc.bias": full[src + "ffn.fc1.bias"],
            dst + "mlp.c_proj.weight": full[src + "ffn.fc2.weight"].t(),
            dst + "mlp.c_proj.bias": full[src + "ffn.fc2.bias"],
        })
    if not mcfg.tie_embeddings:
        out["lm_head.weight"] = full["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def write_gpt2(folder: str, full: dict, mcfg, eod) -> None:
    """config.json and model.safetensors of GPT2LMHeadModel into `folder`; CheckpointError if the model does
    not map exactly onto GPT-2."""
    from safetensors.torch import save_file
    from transformers import GPT2Config
    why = gpt2_refusal(mcfg)
    if why:
        raise CheckpointError("this model does not map exactly onto GPT-2: " + "; ".join(why))
    config = GPT2Config(vocab_size=mcfg.vocab_size, n_positions=mcfg.max_seq_len, n_embd=mcfg.hidden_size,
                        n_layer=mcfg.num_layers, n_head=mcfg.num_attention_heads, n_inner=mcfg.ffn_hidden_size,
                        activation_function="gelu", layer_norm_epsilon=mcfg.norm_eps, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=mcfg.tie_embeddings,
                        bos_token_id=eod, eos_token_id=eod, pad_token_id=eod, architectures=["GPT2LMHeadModel"])
    config.save_pretrained(folder)
    save_file(gpt2_state_dict(full, mcfg), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
