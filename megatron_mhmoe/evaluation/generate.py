"""Sample text from a model exported by tools/export_checkpoint.py (one process, CPU or one GPU).

Examples:
  python tools/generate.py --model exported/quickstart --prompt "def main(" --greedy
  python tools/generate.py --model exported/quickstart --prompt "import " --temperature 0.8 --top-k 40 --seed 1

Loads model.safetensors (safetensors only: no pickle) and config.json, builds the GPT with a single-process
ParallelContext, encodes the prompt with the tokenizer shipped with the export (SentencePiece or bytes),
then decodes greedily or by temperature / top-k sampling from a seeded generator (same seed, same text).
Stops after --max-new-tokens or at end-of-document.
"""
from __future__ import annotations

import json
import os


def load_model(folder: str, device: str = "cpu"):
    """(GPTModel on a single-process context, config.json dict)."""
    import torch
    from safetensors.torch import load_file

    from megatron_mhmoe.config import model_config_from_dict
    from megatron_mhmoe.model.gpt import GPTModel
    from megatron_mhmoe.parallel.context import ParallelContext
    from megatron_mhmoe.parallel.params import shard_full_state_dict

    cfg_path, weights = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
    for path in (cfg_path, weights):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: --model must be a folder written by "
                                    f"tools/export_checkpoint.py")
    with open(cfg_path) as f:
        info = json.load(f)
    mcfg = model_config_from_dict(info["model"])
    ctx = ParallelContext.single_process()
    model = GPTModel(mcfg, ctx)
    full = load_file(weights)
    dtype = next(iter(full.values())).dtype
    local = shard_full_state_dict(model, {k: v.float() for k, v in full.items()}, ctx, mcfg.padded_vocab_size(1))
    model.load_state_dict(local)
    model.to(device=device, dtype=dtype if dtype != torch.float16 or device != "cpu" else torch.float32)
    model.eval()
    return model, info


def load_tokenizer(folder: str, info: dict, override: str | None):
    from megatron_mhmoe.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, build_tokenizer
    if override:
        return ByteTokenizer() if override == "byte" else build_tokenizer("auto", override)
    tok = info.get("tokenizer") or {}
    if tok.get("type") == "byte":
        return ByteTokenizer()
    if tok.get("type") == "sentencepiece":
        return SentencePieceTokenizer(os.path.join(folder, tok["file"]))
    if tok.get("type") == "hf":
        return HFTokenizer(os.path.join(folder, tok["file"]), eod_token=tok.get("eod_token"))
    raise ValueError(f"{folder}/config.json names no tokenizer: pass --tokenizer byte or --tokenizer PATH.model")


def generate(model, prompt_ids: list[int], max_new_tokens: int, greedy: bool = True, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0, eod=None, use_cache: bool = True) -> list[int]:
    """Token ids after the prompt (generate_batch of one prompt)."""
    return generate_batch(model, [prompt_ids], max_new_tokens, greedy, temperature, top_k, seed, eod, use_cache)[0]


def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, greedy: bool = True,
                   temperature: float = 1.0, top_k: int = 0, seed: int = 0, eod=None,
                   use_cache: bool = True) -> list[list[int]]:
    """Token ids after each prompt, decoded together as one left-padded batch. Deterministic for a given seed
    (greedy: for any seed); a row stops at eod (not included) or after max_new_tokens.

    Padding: the prompts are left-padded and an attention mask keeps the pads out of attention and out of the
    positions (GPTModel's attention_mask), so each row gets the tokens it gets alone (dropless routing; with
    capacity_factor > 0 the batch's tokens share the experts' capacity, as in training).
    use_cache: keep each layer's keys and values (model/kv_cache.py) and feed one new token per step.
    Past max_seq_len (the rule of the exported transformers model too): each new token is predicted from the
    last max_seq_len tokens alone, at positions 0 .. max_seq_len - 1; once the sequence is longer, the cache
    restarts on that window every step (the same window the uncached path sees).
    """
    import torch

    from megatron_mhmoe.model.kv_cache import KVCache
    cfg = model.config
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start from end-of-document for an empty one)")
    width = max(len(p) for p in prompts)
    pad = eod if eod is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)  # (b, width)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    padded = bool((mask == 0).any())
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    cache = None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if cache is not None and cache.offset < cfg.max_seq_len:
                feed = ids[:, -1:]  # the cache holds every earlier position of the window
            else:
                feed = ids[:, -cfg.max_seq_len:]
                cache = KVCache(cfg.num_layers) if use_cache else None
            past = cache.offset if cache is not None else 0
            window = mask[:, -(past + feed.shape[1]):] if padded else None
            logits = model(feed.to(device), kv_cache=cache,
                           attention_mask=None if window is None else window.to(device)).logits
            logits = logits[:, -1, :cfg.vocab_size].float().cpu()  # (b, V)
            if greedy:
                nxt = logits.argmax(-1)
            else:
                logits = logits / max(temperature, 1e-6)
                if 0 < top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(1)
            for r, t in enumerate(nxt.tolist()):
                done[r] = done[r] or (eod is not None and t == eod)
                if not done[r]:
                    out[r].append(t)
            if all(done):
                break
            ids = torch.cat([ids, nxt.unsqueeze(1)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out


def prompt_ids(tok, prompt: str, vocab_size: int) -> list[int]:
    """The prompt's token ids (end-of-document for an empty prompt); ValueError when the tokenizer makes ids
    the model does not have."""
    eod = getattr(tok, "eod", None)
    ids = tok.encode(prompt) if prompt else []
    if not ids:
        ids = [eod if eod is not None else 0]
    if any(i >= vocab_size for i in ids):
        raise ValueError(f"the tokenizer produced ids >= the model's vocab_size {vocab_size}: wrong tokenizer for "
                         f"this model?")
    return ids
