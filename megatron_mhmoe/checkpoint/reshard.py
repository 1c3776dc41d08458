"""Convert a training checkpoint to another parallel layout: world size, TP, EP, ZeRO stage (and precision).
ZeRO-3 (dense models only) converts like the other stages, to and from any of them.

Example (train at TP=2 EP=4 on 4 ranks, continue on 2 ranks at TP=1 EP=2 with ZeRO-2):
  python tools/reshard_checkpoint.py --input runs/a/checkpoints --output runs/b/checkpoints \\
      --world-size 2 --tp 1 --ep 2 --zero-stage 2
  torchrun --nproc_per_node 2 -m megatron_mhmoe.train ... --parallel.tp=1 --parallel.ep=2 \\
      --train.zero_stage=2 --train.save_dir=runs/b/checkpoints

What carries over: model weights, the fp32 master weights and Adam moments of every parameter (the
"universal" per-parameter state each checkpoint stores), the step counters, LR scheduler, data position
(consumed_samples) and RNG streams (new rank r takes old rank r mod old world). The output is a normal
checkpoint folder (rank files, manifest with sha256, atomic rename, `latest`) for the target layout, marked
universal-only: it has no DeepSpeed-native optimizer partition, so training restores from the universal
state. Keep the global batch (micro x accumulation x DP) the same to continue the same run.

Input files are checked against the manifest and read with torch.load(weights_only=True): pickled code is
refused. No process group, no model construction: tensors are gathered and re-sharded from the
parameter metadata stored in the checkpoint. Memory: the whole model and its optimizer state, in fp32.
"""
from __future__ import annotations

import os
import time

from megatron_mhmoe.config import ModelConfig
from megatron_mhmoe.runtime.checkpoint import MANIFEST, CheckpointError


def reshard(input_path: str, output: str, world: int, tp: int, ep: int, zero_stage=None, precision=None,
            force: bool = False, log=print) -> str:
    """Convert; returns the written step folder. Raises CheckpointError with the problem and the fix."""
    from megatron_mhmoe.checkpoint import consolidate as C
    from megatron_mhmoe.parallel.layout import RankLayout
    from megatron_mhmoe.runtime import universal
    from megatron_mhmoe.runtime.checkpoint import CheckpointLayout
    from megatron_mhmoe.runtime.engine import checkpoint_safe_globals

    t0 = time.perf_counter()
    C.validate_target(world, tp, ep)
    folder = C.resolve_folder(input_path)
    if os.path.abspath(output) in (os.path.abspath(folder), os.path.abspath(os.path.dirname(folder))):
        raise CheckpointError(f"--output {output} is the input's save_dir: write the converted checkpoint to a new "
                              f"folder")
    if _has_ckpt(output) and not force:
        raise CheckpointError(f"--output {output} already holds a checkpoint: choose an empty folder, or --force")
    manifest, states = C.read_checkpoint(folder, checkpoint_safe_globals(), log)
    C.require_universal(states, folder)
    src = manifest["layout"]
    zero = src["zero_stage"] if zero_stage is None else zero_stage
    C.check_target_zero_stage(states[0]["universal"]["meta"], zero)
    log(f"source: {folder} step {manifest['step']}: world={src['world_size']} TP={src['tp']} EP={src['ep']} "
        f"ZeRO-{src['zero_stage']} {src['precision']}")
    model, optim, meta = C.gather_full(manifest, states)
    vocab, divisible = C.model_vocab(manifest, states)
    padded = ModelConfig(vocab_size=vocab, make_vocab_divisible_by=divisible).padded_vocab_size(tp)
    C.check_divisible(meta, model, tp, ep, padded)
    prec = src["precision"] if precision is None else precision
    layout = CheckpointLayout(world, tp, ep, zero, prec)
    log(f"target: world={world} TP={tp} EP={ep} ZeRO-{zero} {prec} ({len(meta)} parameters, "
        f"{sum(t.numel() for t in model.values()) / 1e6:.3f}M values)")
    src_world = int(src["world_size"])
    rank_states = []
    for r in range(world):
        rl = RankLayout(r, world, tp, ep)
        owners = universal.owner_index(list(meta), meta, rl.dp_size, rl.edp_size)
        base = states[r % src_world]
        local_model, params, new_meta = {}, {}, {}
        for name, full in states[0]["model"].items():
            if name not in meta:  # buffers are replicated
                local_model[name] = full
        for name, m in meta.items():
            if prec == src["precision"]:  # the trained weights as they were (bf16/fp16: bit for bit)
                piece = C.shard_tensor(model[name], m, rl, padded)
            else:  # a new precision: round the fp32 master
                piece = C.shard_tensor(optim[name]["fp32"], m, rl, padded).to(C.DTYPES[prec])
            local_model[name] = piece
            new_meta[name] = dict(m, local_shape=list(piece.shape))
            if owners[name] == (rl.edp_rank if m["expert"] else rl.dp_rank):
                params[name] = {k: C.shard_tensor(optim[name][k], m, rl, padded)
                                for k in ("fp32", "exp_avg", "exp_avg_sq")}
                params[name]["step"] = optim[name]["step"]
        uni = dict(states[0]["universal"], meta=new_meta, params=params,
                   coords={"tp_rank": rl.tp_rank, "tp_size": tp, "ep_rank": rl.ep_rank, "ep_size": ep,
                           "dp_rank": rl.dp_rank, "dp_size": rl.dp_size, "edp_rank": rl.edp_rank,
                           "edp_size": rl.edp_size, "rank": r, "world_size": world})
        state = {k: v for k, v in states[0].items() if k not in ("model", "optimizer", "universal", "rng")}
        state.update(model=local_model, universal=uni, rng=base["rng"])
        rank_states.append(state)
    extra = {k: v for k, v in manifest.items() if k not in ("files", "layout", "step", "time", "format_version")}
    cfg = extra.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("parallel"), dict) and isinstance(cfg.get("train"), dict):
        cfg["parallel"]["tp"], cfg["parallel"]["ep"] = tp, ep
        cfg["train"]["zero_stage"], cfg["train"]["precision"] = zero, prec
    extra.update(layout=layout.__dict__, universal=True, universal_only=True,
                 resharded_from={"folder": os.path.abspath(folder), "layout": src})
    out = C.write_checkpoint(output, int(manifest["step"]), rank_states, extra, log)
    log(f"done: {out} ({time.perf_counter() - t0:.1f} s). Resume with --train.save_dir={output} "
        f"--parallel.tp={tp} --parallel.ep={ep} --train.zero_stage={zero} on {world} rank(s)")
    return out


def _has_ckpt(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    return any(n.startswith("step_") and os.path.exists(os.path.join(path, n, MANIFEST)) for n in os.listdir(path))
