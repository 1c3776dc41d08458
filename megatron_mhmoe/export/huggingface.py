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

import json
import os
import shutil
import tempfile

from megatron_mhmoe import atomic
from megatron_mhmoe.export import gpt2, native
from megatron_mhmoe.runtime.checkpoint import CheckpointError

HF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf")
CODE_FILES = ("configuration_mhmoe.py", "modeling_mhmoe.py", "tokenization_mhmoe.py")
AUTO_MAP = {"AutoConfig": "configuration_mhmoe.MHMoEGPTConfig",
            "AutoModelForCausalLM": "modeling_mhmoe.MHMoEGPTForCausalLM"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_mhmoe.MHMoETokenizer", None]}


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


def _export_eod(export_dir: str, info: dict):
    """The end-of-document id of the tokenizer shipped in a native export (None if it names none)."""
    from megatron_mhmoe.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer
    tok = info.get("tokenizer") or {}
    kind, file = tok.get("type"), os.path.join(export_dir, tok.get("file") or "")
    return (ByteTokenizer.eod if kind == "byte" else SentencePieceTokenizer(file).eod if kind == "sentencepiece"
            else HFTokenizer(file, eod_token=tok.get("eod_token")).eod if kind == "hf" else None)


def _write_mhmoe(folder: str, full: dict, mcfg, info: dict, eod) -> None:
    """Our model's config, weights and code files (loaded with trust_remote_code=True)."""
    from safetensors.torch import save_file

    from megatron_mhmoe.hf.configuration_mhmoe import MHMoEGPTConfig
    from megatron_mhmoe.model.gpt import GPTModel
    from megatron_mhmoe.parallel.context import ParallelContext
    from megatron_mhmoe.parallel.params import shard_full_state_dict
    model = GPTModel(mcfg, ParallelContext.single_process())
    local = shard_full_state_dict(model, full, ParallelContext.single_process(), mcfg.padded_vocab_size(1))
    config = MHMoEGPTConfig(mhmoe_model=info["model"], eos_token_id=eod, pad_token_id=eod,
                            architectures=["MHMoEGPTForCausalLM"], auto_map=AUTO_MAP)
    config.save_pretrained(folder)
    save_file({f"model.{k}": v.contiguous() for k, v in local.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    for name in CODE_FILES:
        shutil.copyfile(os.path.join(HF_DIR, name), os.path.join(folder, name))


def export_hf(input_path: str, output: str, fmt: str = "mhmoe", tokenizer: str | None = None, force: bool = False,
              log=print) -> str:
    """Write the transformers folder `output` (see the module docstring); returns it. Raises CheckpointError
    with the problem and the fix."""
    from safetensors.torch import load_file

    from megatron_mhmoe.config import model_config_from_dict

    if os.path.exists(output) and not force:
        raise CheckpointError(f"--output {output} exists: choose a new folder, or --force to replace it")
    with tempfile.TemporaryDirectory() as scratch:
        export_dir = input_path
        if not native.is_export(input_path):
            export_dir = os.path.join(scratch, "export")
            native.export(input_path, export_dir, tokenizer=tokenizer, log=lambda m: None)
        with open(os.path.join(export_dir, "config.json")) as f:
            info = json.load(f)
        mcfg = model_config_from_dict(info["model"])
        eod = _export_eod(export_dir, info)
        full = load_file(os.path.join(export_dir, "model.safetensors"))
        with atomic.atomic_dir(output, replace=force) as tmp:
            if fmt == "gpt2":
                gpt2.write_gpt2(tmp, full, mcfg, eod)
            else:
                _write_mhmoe(tmp, full, mcfg, info, eod)
            _write_tokenizer(tmp, export_dir, info, eod)
            with open(os.path.join(tmp, "mhmoe_export.json"), "w") as f:
                json.dump({"format": fmt, "step": info.get("step"), "source": info.get("source"),
                           "model": info["model"]}, f, indent=1)
    n = sum(v.numel() for v in full.values())
    log(f"exported {input_path} -> {output} ({fmt}, {n / 1e6:.3f}M parameters, step {info.get('step')})")
    return output
