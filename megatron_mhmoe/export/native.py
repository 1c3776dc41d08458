"""Export a training checkpoint (any world size, TP, EP, ZeRO stage) as one single-process model.

Example:
  python tools/export_checkpoint.py --input runs/quickstart/checkpoints --output exported/quickstart
  python tools/generate.py --model exported/quickstart --prompt "def main(" --greedy

Writes into --output (atomically: a temp folder renamed at the end):
  model.safetensors   full tensors by parameter name (vocabulary unpadded; experts stacked [E, ...])
  config.json         {"model": ModelConfig fields, "step", "source", "dtype", "tokenizer": {...}}
  tokenizer.model     a copy of the run's SentencePiece model, or tokenizer.json for a Hugging Face tokenizer
                      (neither for the byte tokenizer)
The weights are the ones the run trained with (fp32, or bf16/fp16 as stored); --dtype converts.
Input files are checked against the manifest and read with torch.load(weights_only=True) only.
"""
from __future__ import annotations

import json
import os
import shutil
import time

from megatron_mhmoe import atomic
from megatron_mhmoe.runtime.checkpoint import CheckpointError

TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"


def is_export(folder: str) -> bool:
    """Whether `folder` was written by export() (a model.safetensors beside a config.json with a model)."""
    cfg = os.path.join(folder, "config.json")
    if not (os.path.isfile(cfg) and os.path.isfile(os.path.join(folder, "model.safetensors"))):
        return False
    with open(cfg) as f:
        return "model" in json.load(f)


def _tokenizer_at(path: str, eod_token: str | None = None) -> dict:
    """{"type": "hf", "path": tokenizer.json, "eod_token"} or {"type": "sentencepiece", "path": ...} for a file."""
    from megatron_mhmoe.data.tokenizer import resolve_tokenizer_type
    if resolve_tokenizer_type("auto", path) == "hf":
        from megatron_mhmoe.data.tokenizer import HFTokenizer
        tok = HFTokenizer(path, eod_token=eod_token)
        return {"type": "hf", "path": tok.model_path, "eod_token": tok.eod_token}
    return {"type": "sentencepiece", "path": path}


def find_tokenizer(config: dict, override: str | None) -> dict:
    """{"type": "byte"}, {"type": "sentencepiece" | "hf", "path": ...} or {"type": None} if unknown."""
    if override:
        if override == "byte":
            return {"type": "byte"}
        if not os.path.exists(override):
            raise CheckpointError(f"--tokenizer {override} does not exist")
        return _tokenizer_at(override)
    data = config.get("data", {}) if isinstance(config, dict) else {}
    if data.get("tokenizer_model") and os.path.exists(data["tokenizer_model"]):
        return _tokenizer_at(data["tokenizer_model"])
    paths = [p for p in data.get("data_path", []) if isinstance(p, str)]
    for prefix in paths:
        meta_path = prefix + ".meta.json"
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            kind = meta.get("tokenizer_type")
            if kind in ("byte", "ByteTokenizer"):
                return {"type": "byte"}
            model = meta.get("tokenizer_model")
            if model and os.path.exists(model):
                return _tokenizer_at(model, meta.get("eod_token"))
    return {"type": None}


def check_export_tokenizer(config: dict, tok: dict) -> None:
    """CheckpointError when the tokenizer found for the export is not the one the run's data was made with
    (its .meta.json files record type and sha256): the export would ship a tokenizer the model never saw."""
    if not tok.get("path"):
        return
    from megatron_mhmoe.data.tokenizer import build_tokenizer
    from megatron_mhmoe.data.vocab import tokenizer_mismatches
    built = build_tokenizer("auto", tok["path"])
    data = config.get("data", {}) if isinstance(config, dict) else {}
    prefixes = [p for p in data.get("data_path", []) if isinstance(p, str) and os.path.exists(p + ".meta.json")]
    found = tokenizer_mismatches(tok["path"], built.type_name, built.sha256, prefixes)
    if found:
        raise CheckpointError("the run's data.tokenizer_model is not the tokenizer its data was made with: "
                              + "; ".join(found) + ". Pass --tokenizer with the one the model learned (the data's)")


def _copy_tokenizer(tok: dict, folder: str, log) -> dict:
    """The tokenizer file copied into the export folder; its config.json entry."""
    entry = {"type": tok["type"]}
    if tok["type"] == "sentencepiece":
        shutil.copyfile(tok["path"], os.path.join(folder, TOKENIZER_FILE))
        entry["file"] = TOKENIZER_FILE
    elif tok["type"] == "hf":
        shutil.copyfile(tok["path"], os.path.join(folder, HF_TOKENIZER_FILE))
        entry.update(file=HF_TOKENIZER_FILE, eod_token=tok["eod_token"])
    elif tok["type"] is None:
        log("WARNING: the run's tokenizer was not found; pass --tokenizer to tools/generate.py, or re-export with "
            "--tokenizer")
    return entry


def export(input_path: str, output: str, dtype: str = "as-trained", tokenizer: str | None = None,
           force: bool = False, log=print) -> str:
    """Write the export folder `output` (see the module docstring); returns it. Raises CheckpointError with
    the problem and the fix."""
    from safetensors.torch import save_file

    from megatron_mhmoe.checkpoint import consolidate as C
    from megatron_mhmoe.runtime.engine import checkpoint_safe_globals

    t0 = time.perf_counter()
    if os.path.exists(output) and not force:
        raise CheckpointError(f"--output {output} exists: choose a new folder, or --force to replace it")
    folder = C.resolve_folder(input_path)
    manifest, states = C.read_checkpoint(folder, checkpoint_safe_globals(), log)
    C.require_universal(states, folder)  # the parameter metadata lives there
    model, _, meta = C.gather_full(manifest, states, with_optimizer=False)
    config = manifest.get("config") or {}
    if "model" not in config:
        raise CheckpointError(f"{folder}/manifest.json has no model config: cannot write config.json")
    if dtype != "as-trained":
        model = {k: (v.to(C.DTYPES[dtype]) if v.is_floating_point() else v) for k, v in model.items()}
    tok = find_tokenizer(config, tokenizer)
    if tokenizer is None:
        check_export_tokenizer(config, tok)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in model.values()})
    with atomic.atomic_dir(output, replace=force) as tmp:
        save_file({k: v.contiguous() for k, v in model.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt", "source": os.path.abspath(folder), "step": str(manifest["step"])})
        tok_entry = _copy_tokenizer(tok, tmp, log)
        cfg_json = {"model": config["model"], "step": int(manifest["step"]), "source": os.path.abspath(folder),
                    "source_layout": manifest["layout"], "dtype": dtypes, "tokenizer": tok_entry,
                    "parameters": {k: list(v.shape) for k, v in model.items()}}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg_json, f, indent=1)
    n = sum(v.numel() for v in model.values())
    log(f"exported {folder} (step {manifest['step']}) -> {output}: {len(model)} tensors, {n / 1e6:.3f}M values, "
        f"{', '.join(dtypes)}, tokenizer {tok['type']} ({time.perf_counter() - t0:.1f} s)")
    return output
