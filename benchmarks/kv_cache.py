"""Generation speed with and without the KV cache, side by side in one run (random weights, CPU or GPU).

  python benchmarks/kv_cache.py [--prompt 256] [--new 128] [--max-seq-len 512] [--hidden 256] [--layers 4]

Prints tokens/s of `tools/generate.py`'s loop both ways on the same MH-MoE model and prompt, the ratio, and
whether the greedy tokens agree.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_mhmoe.config import ModelConfig, MoEConfig  # noqa: E402
from megatron_mhmoe.evaluation import generate as gen  # noqa: E402
from megatron_mhmoe.model.gpt import GPTModel  # noqa: E402
from megatron_mhmoe.parallel.context import ParallelContext  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="tokens to generate")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.prompt + a.new > a.max_seq_len:
        p.error(f"--prompt + --new = {a.prompt + a.new} must fit --max-seq-len {a.max_seq_len}")
    cfg = ModelConfig(vocab_size=2048, hidden_size=a.hidden, num_layers=a.layers, num_attention_heads=8,
                      ffn_hidden_size=4 * a.hidden, max_seq_len=a.max_seq_len, position_embedding="rope",
                      moe=MoEConfig(num_experts=8, top_k=2, num_heads=4, expert_hidden_size=a.hidden,
                                    capacity_factor=0.0))
    model = GPTModel(cfg, ParallelContext.single_process(), seed=0).to(a.device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    result = {}
    for use_cache in (True, False):
        t0 = time.perf_counter()
        out = gen.generate(model, prompt, a.new, greedy=True, use_cache=use_cache)
        result["cache" if use_cache else "no_cache"] = (a.new / (time.perf_counter() - t0), out)
    (fast, a_out), (slow, b_out) = result["cache"], result["no_cache"]
    print(json.dumps({"prompt": a.prompt, "new": a.new, "hidden": a.hidden, "layers": a.layers,
                      "tokens_per_s_cache": round(fast, 1), "tokens_per_s_no_cache": round(slow, 1),
                      "speedup": round(fast / slow, 2), "same_tokens": a_out == b_out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
