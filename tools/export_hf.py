#!/usr/bin/env python
"""Export a trained model as a Hugging Face transformers folder.

Examples:
  python tools/export_hf.py --input runs/quickstart/checkpoints --output exported/quickstart-hf
  python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \
      m = AutoModelForCausalLM.from_pretrained('exported/quickstart-hf', trust_remote_code=True); \
      t = AutoTokenizer.from_pretrained('exported/quickstart-hf', trust_remote_code=True)"
  python tools/export_hf.py --input runs/dense/checkpoints --output exported/dense-gpt2 --format gpt2

--input is a checkpoint (a step folder or a save_dir, any TP/EP/ZeRO layout) or a folder written by
tools/export_checkpoint.py. Formats:
  mhmoe  (default, every model) config.json, model.safetensors, tokenizer files and the code files
         configuration_mhmoe.py / modeling_mhmoe.py / tokenization_mhmoe.py: load with trust_remote_code=True;
         the model code is plain torch + transformers (no megatron_mhmoe needed where it is loaded); the
         tokenizer pads on the left (what generate() needs).
  gpt2   dense models with learned positions, LayerNorm, GELU MLP: a plain GPT-2 checkpoint
         (GPT2LMHeadModel, no remote code); the tokenizer files are the same as for mhmoe.
The folder is written atomically (a temp folder renamed at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_mhmoe.runtime.checkpoint import CheckpointError  # noqa: E402

HF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_mhmoe", "hf")
CODE_FILES = ("configuration_mhmoe.py", "modeling_mhmoe.py", "tokenization_mhmoe.py")
AUTO_MAP = {"AutoConfig": "configuration_mhmoe.MHMoEGPTConfig",
            "AutoModelForCausalLM": "modeling_mhmoe.MHMoEGPTForCausalLM"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_mhmoe.MHMoETokenizer", None]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="checkpoint (step folder or save_dir) or export_checkpoint folder")
    p.add_argument("--output", required=True, help="folder to write (must not exist, unless --force)")
    p.add_argument("--format", choices=["mhmoe", "gpt2"], default="mhmoe")
    p.add_argument("--tokenizer", default=None,
                   help="'byte', a SentencePiece .model or a tokenizer.json (default: the run's)")
    p.add_argument("--force", action="store_true", help="replace an existing --output folder")
    p.add_argument("--quiet", action="store_true", help="only errors")
    return p


def _load_tool(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _is_export(folder: str) -> bool:
    cfg = os.path.join(folder, "config.json")
    if not (os.path.isfile(cfg) and os.path.isfile(os.path.join(folder, "model.safetensors"))):
        return False
    with open(cfg) as f:
        return "model" in json.load(f)


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
            dst + "mlp.c_fc.weight": full[src + "ffn.fc1.weight"].t(), dst + "mlp.c_fc.bias": full[src + "ffn.fc1.bias"],
            dst + "mlp.c_proj.weight": full[src + "ffn.fc2.weight"].t(),
            dst + "mlp.c_proj.bias": full[src + "ffn.fc2.bias"],
        })
    if not mcfg.tie_embeddings:
        out["lm_head.weight"] = full["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _write_tokenizer(tmp: str, export_dir: str, info: dict, eod: int) -> None:
    tok = info.get("tokenizer") or {}
    max_len = int(info["model"].get("max_seq_len", 0))
    if tok.get("type") == "hf":
        # A tokenizers file is what transformers' own fast tokenizer reads: no remote code needed.
        shutil.copyfile(os.path.join(export_dir, tok["file"]), os.path.join(tmp, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok["eod_token"],
                  "pad_token": tok["eod_token"], "padding_side": "left", "model_max_length": max_len,
                  "add_bos_token": False, "add_eos_token": False}
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=1)
        return
    if tok.get("type") == "sentencepiece":
        shutil.copyfile(os.path.join(export_dir, tok["file"]), os.path.join(tmp, "tokenizer.model"))
        kind = "sentencepiece"
    elif tok.get("type") == "byte":
        kind = "byte"
    else:
        raise CheckpointError("the export names no tokenizer: pass --tokenizer byte or --tokenizer PATH.model")
    shutil.copyfile(os.path.join(HF_DIR, "tokenization_mhmoe.py"), os.path.join(tmp, "tokenization_mhmoe.py"))
    config = {"tokenizer_class": "MHMoETokenizer", "kind": kind, "auto_map": TOKENIZER_AUTO_MAP,
              "padding_side": "left", "model_max_length": max_len,
              "eod_token_id": eod}
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def export_hf(input_path: str, output: str, fmt: str = "mhmoe", tokenizer: str | None = None, force: bool = False,
              log=print) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    from megatron_mhmoe.config import model_config_from_dict
    from megatron_mhmoe.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer

    if os.path.exists(output) and not force:
        raise CheckpointError(f"--output {output} exists: choose a new folder, or --force to replace it")
    with tempfile.TemporaryDirectory() as scratch:
        export_dir = input_path
        if not _is_export(input_path):
            export_dir = os.path.join(scratch, "export")
            _load_tool("export_checkpoint").export(input_path, export_dir, tokenizer=tokenizer, log=lambda m: None)
        with open(os.path.join(export_dir, "config.json")) as f:
            info = json.load(f)
        mcfg = model_config_from_dict(info["model"])
        tok = info.get("tokenizer") or {}
        kind, file = tok.get("type"), os.path.join(export_dir, tok.get("file") or "")
        eod = (ByteTokenizer.eod if kind == "byte" else SentencePieceTokenizer(file).eod if kind == "sentencepiece"
               else HFTokenizer(file, eod_token=tok.get("eod_token")).eod if kind == "hf" else None)
        full = load_file(os.path.join(export_dir, "model.safetensors"))
        tmp = f"{output.rstrip(os.sep)}.tmp-{os.getpid()}"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        if fmt == "gpt2":
            why = gpt2_refusal(mcfg)
            if why:
                raise CheckpointError("this model does not map exactly onto GPT-2: " + "; ".join(why))
            from transformers import GPT2Config
            config = GPT2Config(vocab_size=mcfg.vocab_size, n_positions=mcfg.max_seq_len, n_embd=mcfg.hidden_size,
                                n_layer=mcfg.num_layers, n_head=mcfg.num_attention_heads, n_inner=mcfg.ffn_hidden_size,
                                activation_function="gelu", layer_norm_epsilon=mcfg.norm_eps, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=mcfg.tie_embeddings,
                                bos_token_id=eod, eos_token_id=eod, pad_token_id=eod, architectures=["GPT2LMHeadModel"])
            config.save_pretrained(tmp)
            save_file(gpt2_state_dict(full, mcfg), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            from megatron_mhmoe.hf.configuration_mhmoe import MHMoEGPTConfig
            from megatron_mhmoe.model.gpt import GPTModel
            from megatron_mhmoe.parallel.context import ParallelContext
            from megatron_mhmoe.parallel.params import shard_full_state_dict
            model = GPTModel(mcfg, ParallelContext.single_process())
            local = shard_full_state_dict(model, full, ParallelContext.single_process(), mcfg.padded_vocab_size(1))
            config = MHMoEGPTConfig(mhmoe_model=info["model"], eos_token_id=eod, pad_token_id=eod,
                                    architectures=["MHMoEGPTForCausalLM"], auto_map=AUTO_MAP)
            config.save_pretrained(tmp)
            save_file({f"model.{k}": v.contiguous() for k, v in local.items()}, os.path.join(tmp, "model.safetensors"),
                      metadata={"format": "pt"})
            for name in CODE_FILES:
                shutil.copyfile(os.path.join(HF_DIR, name), os.path.join(tmp, name))
        _write_tokenizer(tmp, export_dir, info, eod)
        with open(os.path.join(tmp, "mhmoe_export.json"), "w") as f:
            json.dump({"format": fmt, "step": info.get("step"), "source": info.get("source"),
                       "model": info["model"]}, f, indent=1)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.replace(tmp, output)
    n = sum(v.numel() for v in full.values()) if torch is not None else 0
    log(f"exported {input_path} -> {output} ({fmt}, {n / 1e6:.3f}M parameters, step {info.get('step')})")
    return output


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    from megatron_mhmoe.runtime.consolidate import run_checkpoint_tool
    return run_checkpoint_tool(lambda: export_hf(args.input, args.output, args.format, args.tokenizer, args.force,
                                                 log), args.input)


if __name__ == "__main__":
    sys.exit(main())
