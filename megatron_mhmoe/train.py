"""Training entry point: `python -m megatron_mhmoe.train [--config F] [--deepspeed_config F] [--a.b=v ...]`.

Launched by `deepspeed`, `torchrun` or plain `python` (one process). Without data_path it trains on the
built-in corpus (this machine's Python stdlib), preparing it on first use.

The loop, per optimizer step:
1. grad_accum micro-batches of this DP rank's share of the global batch: forward, engine.backward;
2. ZeRO-1/2 clip inside the engine (each expert counted once); ZeRO-0 clips here with the exact norm;
3. engine.step (fp16 overflow skips the step inside the engine; so does a non-finite gradient norm in
   ZeRO-1/2 (DeepSpeed) and ZeRO-0 fp32 (here));
4. every log_interval: metrics line, wandb, routing statistics; every eval_interval: validation
   perplexity; every save_interval: an atomic checkpoint with data position and RNG state (never from a
   non-finite step).

Exit codes: 0 done; 1 an error while training (one `[rank R] error: ...` line); 2 a config/data error, found
before any process group forms; 3 train.max_nonfinite_steps non-finite steps in a row (the last good
checkpoint is kept); 4 a collective failed or timed out (a peer rank died or is stuck, after at most
parallel.timeout_s), or the process group could not form. Tests inject faults with MHMOE_FAULT
(runtime/faults.py).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_mhmoe.runtime.logging import redact_text
from megatron_mhmoe.runtime.cli import parse_args, resolve_config
from megatron_mhmoe.runtime.run_config import RunConfig, check_ds_config_agrees

PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def _single_process_env() -> None:
    """Plain `python -m megatron_mhmoe.train`: a one-rank group on loopback (DeepSpeed needs one)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    from megatron_mhmoe.parallel.spawn import free_port
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


EXIT_NONFINITE = 3
"""Exit code: too many non-finite steps in a row (train.max_nonfinite_steps); the last good checkpoint is kept."""
EXIT_PEER_FAILURE = 4
"""Exit code: a collective failed or timed out (a peer rank died or is stuck), or the group could not form."""


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:limit]}"


def _is_comm_failure(e: BaseException) -> bool:
    """A gloo/NCCL/store failure (timeout, peer gone), which torch raises as RuntimeError from deep inside."""
    if type(e).__name__ in ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError"):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "gloo", "Gloo", "NCCL", "Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
        "Broken pipe", "Socket Timeout"))


def _comm_failure_message(e: BaseException, cfg: RunConfig) -> str:
    text = str(e)
    hint = (f"check the other ranks' output for the first error, then relaunch: training resumes from the last "
            f"complete checkpoint in {cfg.train.save_dir} (detail: {_first_line(e)})")
    if "imed out" in text or "Timeout" in text or "timeout" in text:
        return (f"collective timed out after {cfg.parallel.timeout_s:g}s (parallel.timeout_s): a peer rank died or "
                f"is stuck; {hint}")
    return (f"collective failed: a peer rank died or is stuck (its connection dropped before the "
            f"parallel.timeout_s={cfg.parallel.timeout_s:g}s timeout); {hint}")


def _check_data_inputs(cfg: RunConfig) -> None:
    """Files the run reads, checked before any process group forms (ValueError/DataError with the fix)."""
    from megatron_mhmoe.data.blend import parse_blend
    from megatron_mhmoe.data.errors import DataError
    from megatron_mhmoe.data.indexed import IndexedDataset, _suggest_prefixes
    from megatron_mhmoe.data.split import parse_split
    from megatron_mhmoe.data.vocab import check_dataset_vocab
    parse_split(cfg.data.split)
    if cfg.data.data_path:
        prefixes, _ = parse_blend(cfg.data.data_path)
        for prefix in prefixes:
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise DataError(f"dataset file {prefix + ext} does not exist (data.data_path prefix {prefix!r})."
                                    + _suggest_prefixes(prefix))
            # Header, sizes and (from the .meta.json sidecar, free) the vocabulary: cheap, no token scan.
            check_dataset_vocab(IndexedDataset(prefix), cfg.model.vocab_size, scan_without_meta=False)
    if cfg.data.tokenizer_model and not os.path.isfile(cfg.data.tokenizer_model):
        raise DataError(f"data.tokenizer_model {cfg.data.tokenizer_model!r} does not exist: train one with "
                        f"tools/train_tokenizer.py or point at the model the data was made with")


def rank0_print(*a, **k) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **k, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = resolve_config(args.config, overrides)
    except ValueError as e:
        print(f"config error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    if args.print_config:
        from megatron_mhmoe.runtime.logging import redact
        print(json.dumps(redact(cfg.to_dict()), indent=1))
        return 0
    _single_process_env()
    world = int(os.environ["WORLD_SIZE"])
    # Validate before joining the process group: a bad config must not leave peers waiting.
    try:
        cfg.validate(world)
        if args.deepspeed_config:
            if not os.path.exists(args.deepspeed_config):
                raise ValueError(f"--deepspeed_config {args.deepspeed_config!r} does not exist")
            with open(args.deepspeed_config) as f:
                try:
                    ds_dict = json.load(f)
                except json.JSONDecodeError as err:
                    raise ValueError(f"--deepspeed_config {args.deepspeed_config} is not valid JSON: {err}")
            check_ds_config_agrees(cfg, ds_dict, args.deepspeed_config)
        _check_data_inputs(cfg)
        if cfg.train.precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("train.precision=fp16 needs a GPU: DeepSpeed's CPU accelerator does not support fp16 "
                             "('Type fp16 is not supported on your device'); use bf16 or fp32 on CPU")
        from megatron_mhmoe.runtime import faults
        armed = faults.check()
    except ValueError as e:
        from megatron_mhmoe.data.errors import DataError
        print(f"{'data' if isinstance(e, DataError) else 'config'} error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    if armed:
        print(armed, file=sys.stderr, flush=True)
    from megatron_mhmoe.runtime import engine as ds
    rank = os.environ.get("RANK", "?")
    try:
        ds.init_distributed(cfg.parallel.timeout_s)
    except Exception as e:  # a peer that never arrives, a taken port, an unreachable master
        print(f"[rank {rank}] error: could not join the process group of {world} ranks at "
              f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within parallel.timeout_s="
              f"{cfg.parallel.timeout_s:g}s: {redact_text(_first_line(e))}", file=sys.stderr, flush=True)
        if os.environ.get("MHMOE_TRACEBACK"):
            raise
        sys.stderr.flush()
        os._exit(EXIT_PEER_FAILURE)
    try:
        code = Trainer(cfg, args.deepspeed_config).run()
    except Exception as e:
        if _is_comm_failure(e):
            msg, exit_code = _comm_failure_message(e, cfg), EXIT_PEER_FAILURE
        else:
            msg, exit_code = f"{type(e).__name__}: {e}", 1
        print(f"[rank {rank}] error: {redact_text(msg)}", file=sys.stderr, flush=True)
        if os.environ.get("MHMOE_TRACEBACK"):
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        # Never dist.destroy_process_group() here: with a dead peer it can block; leave at once.
        os._exit(exit_code)
    # gloo sometimes aborts in interpreter teardown after training (PLATFORM.md): leave cleanly.
    try:
        dist.barrier()
        dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config_path: Optional[str]):
        self.cfg = cfg
        self.ds_config_path = ds_config_path

    # ------------------------------------------------------------------ setup
    def _data(self, ctx):
        from megatron_mhmoe.data import build_train_valid_test_datasets
        from megatron_mhmoe.data.builtin_data import prepare_builtin_data
        from megatron_mhmoe.data.tokenizer import SentencePieceTokenizer
        cfg = self.cfg
        if not cfg.data.data_path:
            data_dir = os.path.join(os.path.dirname(os.path.abspath(cfg.run_dir)), "builtin_data")
            if ctx.rank == 0:
                prefix, tok = prepare_builtin_data(data_dir, vocab_size=min(cfg.model.vocab_size, 4096))
            dist.barrier()
            if ctx.rank != 0:
                prefix, tok = prepare_builtin_data(data_dir, vocab_size=min(cfg.model.vocab_size, 4096))
            cfg.data.data_path = [prefix]
            cfg.data.tokenizer_model = tok
        tokenizer = None
        if cfg.data.tokenizer_model:
            if not os.path.exists(cfg.data.tokenizer_model):
                raise FileNotFoundError(f"data.tokenizer_model {cfg.data.tokenizer_model!r} does not exist: train one "
                                        f"with tools/train_tokenizer.py or point at the model the data was made with")
            tokenizer = SentencePieceTokenizer(cfg.data.tokenizer_model)
            if tokenizer.vocab_size > cfg.model.vocab_size:
                raise ValueError(f"tokenizer {cfg.data.tokenizer_model} has {tokenizer.vocab_size} pieces but "
                                 f"model.vocab_size is {cfg.model.vocab_size}: set --model.vocab_size="
                                 f"{tokenizer.vocab_size}")
        t = cfg.train
        evals = (t.train_steps // max(1, t.eval_interval) + 2) * t.eval_iters * t.micro_batch_size * ctx.dp_size
        data_path = cfg.data.data_path if len(cfg.data.data_path) > 1 else cfg.data.data_path[0]
        log = (lambda m: print(f"[data] {m}", file=sys.stderr, flush=True)) if ctx.rank == 0 else (lambda m: None)
        # Rank 0 builds (and caches) the indices first; the others then read the cache.
        eval_seed = t.seed if cfg.data.eval_seed is None else cfg.data.eval_seed
        train_ds = valid_ds = None

        def build(seed: int, sizes: tuple):
            return build_train_valid_test_datasets(
                data_path, cfg.data.split, t.seq_len, seed, sizes, cache_dir=cfg.data.cache_dir or None,
                model_vocab_size=cfg.model.vocab_size, log=log)

        for turn in (0, 1):
            if (ctx.rank == 0) == (turn == 0):
                if eval_seed == t.seed:
                    train_ds, valid_ds, _ = build(t.seed, (t.train_steps * t.global_batch_size, evals, 0))
                else:
                    train_ds = build(t.seed, (t.train_steps * t.global_batch_size, 0, 0))[0]
                    valid_ds = build(eval_seed, (0, evals, 0))[1]
            dist.barrier()
        return train_ds, valid_ds, tokenizer

    def run(self) -> int:
        from megatron_mhmoe.data import make_batch_iterator
        from megatron_mhmoe.model.gpt import GPTModel
        from megatron_mhmoe.moe import sizing
        from megatron_mhmoe.moe import metrics
        from megatron_mhmoe.moe.metrics import summarize
        from megatron_mhmoe.parallel.context import ParallelContext
        from megatron_mhmoe.parallel.grads import clip_gradients_
        from megatron_mhmoe.runtime import engine as ds
        from megatron_mhmoe.runtime import faults
        from megatron_mhmoe.runtime import universal
        from megatron_mhmoe.runtime.checkpoint import (CheckpointError, Checkpointer, CheckpointLayout,
                                                       model_mismatch, rng_state, set_rng_state, step_dirname)
        from megatron_mhmoe.data.indexed import write_json_atomic
        from megatron_mhmoe.runtime.logging import MetricsLogger, format_line, redact
        from megatron_mhmoe.runtime.schedule import make_lr_lambda

        cfg, t = self.cfg, self.cfg.train
        ctx = ParallelContext.from_world(cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.sequence_parallel,
                                         timeout_s=cfg.parallel.timeout_s)
        rank0 = ctx.rank == 0
        if cfg.train.save_dir == "runs/default/checkpoints" and cfg.run_dir != "runs/default":
            cfg.train.save_dir = os.path.join(cfg.run_dir, "checkpoints")
        train_ds, valid_ds, tokenizer = self._data(ctx)

        # Same seed on a TP group (replicated activations, dropout masks), different per DP replica.
        torch.manual_seed(t.seed + 1000 * ctx.dp_rank)
        model = GPTModel(cfg.model, ctx, seed=t.seed)
        model.activation_checkpointing = t.activation_checkpointing
        counts = model.num_params()
        flops_tok = sizing.flops_per_token(cfg.model, t.seq_len)
        if rank0:
            print("=" * 80)
            print(json.dumps(redact(cfg.to_dict()), indent=1))
            print(ctx.describe())
            print("parameters: " + ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in counts.items()))
            print(f"forward FLOPs per token: {flops_tok / 1e6:.2f} MFLOP (x3 for training)")
            print(f"batch: micro {t.micro_batch_size} x accumulation {t.grad_accum_steps} x DP {ctx.dp_size} = "
                  f"global {t.global_batch_size} sequences of {t.seq_len} tokens")
            print("=" * 80, flush=True)

        base = None
        if self.ds_config_path:
            with open(self.ds_config_path) as f:
                base = json.load(f)
        ds_config = ds.build_ds_config(cfg, ctx.world_size, base)
        engine = ds.initialize(model, cfg, ctx, ds_config, make_lr_lambda(t))
        module = engine.module

        layout = CheckpointLayout(ctx.world_size, ctx.tp_size, ctx.ep_size, t.zero_stage, t.precision)
        ckpt = Checkpointer(t.save_dir, ctx, layout, t.keep_last, log=rank0_print,
                            safe_globals=ds.checkpoint_safe_globals())
        step, consumed, wandb_id = 0, 0, None
        if t.resume:
            loaded = ckpt.load_latest()
            if loaded is not None:
                step, state, manifest = loaded
                problem = model_mismatch(module.state_dict(), state["model"],
                                         (manifest.get("config") or {}).get("model"), cfg.to_dict()["model"])
                if problem:
                    raise CheckpointError(f"checkpoint {os.path.join(t.save_dir, step_dirname(step))} holds a "
                                          f"different model than this config: {problem}. Launch with the config it "
                                          f"was trained with (saved in its manifest.json), or start fresh in another "
                                          f"run_dir (or --train.resume=false)")
                module.load_state_dict(state["model"])
                _load_optimizer(engine, module, ctx, state)
                set_rng_state(state["rng"])
                consumed = int(state["consumed_samples"])
                wandb_id = manifest.get("wandb_id")
                engine.global_steps = step
                rank0_print(f"resumed from {t.save_dir} at step {step} ({consumed} samples consumed)")

        logger = MetricsLogger(cfg.run_dir, cfg.wandb, cfg.to_dict(), rank0,
                               run_name=os.path.basename(os.path.abspath(cfg.run_dir)), resume_id=wandb_id)
        eod = tokenizer.eod if tokenizer is not None else None
        batches = make_batch_iterator(train_ds, t.micro_batch_size, t.grad_accum_steps, ctx.dp_rank, ctx.dp_size,
                                      consumed, eod=eod)
        dispatchers = [m.dispatcher for m in module.modules() if hasattr(m, "dispatcher")]
        for d in dispatchers:
            d.profile_enabled = not torch.cuda.is_available()
        peak = _peak_tflops()
        threshold = cfg.model.moe.activation_threshold if cfg.model.moe else 0.5

        def save():
            state = {"model": module.state_dict(), "optimizer": engine.optimizer.state_dict(),
                     "scheduler": engine.lr_scheduler.state_dict(), "rng": rng_state(),
                     "consumed_samples": consumed, "step": step}
            # Per-parameter optimizer state for tools/reshard_checkpoint.py (runtime/universal.py).
            uni = universal.collect(engine, module, ctx, cfg.model)
            if uni is not None:
                state["universal"] = uni
            return ckpt.save(step, state, {"wandb_id": logger.run_id, "config": redact(cfg.to_dict()),
                                           "consumed_samples": consumed, "universal": uni is not None})

        val_routing: dict = {}

        def evaluate() -> float:
            """Validation LM loss; also keeps the validation set's routing counts in val_routing."""
            engine.eval()
            it = make_batch_iterator(valid_ds, t.micro_batch_size, 1, ctx.dp_rank, ctx.dp_size, 0, eod=eod)
            total = torch.zeros(2, dtype=torch.float64)
            selections, divergence = None, None
            with torch.no_grad():
                for _ in range(t.eval_iters):
                    try:
                        b = next(it)
                    except StopIteration:
                        break
                    out = engine(b["tokens"], labels=b["labels"], loss_mask=b["loss_mask"])
                    total += torch.tensor([float(out.lm_loss) * float(b["loss_mask"].sum()),
                                           float(b["loss_mask"].sum())], dtype=torch.float64)
                    if out.moe_stats:
                        sel = torch.stack([st.selections.double() for st in out.moe_stats])  # (L, E)
                        div = torch.stack([st.divergence.double() for st in out.moe_stats])  # (L, h*k+1)
                        selections = sel if selections is None else selections + sel
                        divergence = div if divergence is None else divergence + div
            if ctx.dp_group is not None:
                dist.all_reduce(total, group=ctx.dp_group)
                if selections is not None:
                    dist.all_reduce(selections, group=ctx.dp_group)
                    dist.all_reduce(divergence, group=ctx.dp_group)
            if selections is not None:
                val_routing.update(selections=selections, divergence=divergence)
            engine.train()
            return float(total[0] / max(total[1], 1.0))

        progress = None
        if rank0:
            from tqdm import tqdm
            progress = tqdm(total=t.train_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=2.0, file=sys.stderr, disable=None)
        out_line = (progress.write if progress is not None else print)
        window = {"t0": time.perf_counter(), "steps": 0, "tokens": 0, "a2a": 0.0}
        guard = NonFiniteGuard(t.max_nonfinite_steps)
        last_val = None
        start_step = step
        loop_t0 = time.perf_counter()
        stats_all: list = []
        while step < t.train_steps:
            sums = torch.zeros(4, dtype=torch.float64)  # loss, lm, aux, z
            stats_all = []
            skipped_before = ds.skipped_steps(engine)
            for micro in range(t.grad_accum_steps):
                b = next(batches)
                out = engine(b["tokens"], labels=b["labels"], loss_mask=b["loss_mask"])
                if faults.active():  # tests only (MHMOE_FAULT): die/hang mid-step, poison the loss
                    if micro == 0:
                        faults.at_step(step + 1, ctx.rank)
                    poison = faults.loss_value(step + 1)
                    if poison is not None:
                        out.loss = out.loss * poison
                engine.backward(out.loss)
                sums += torch.tensor([float(out.loss.detach()), float(out.lm_loss.detach()),
                                      float(out.aux_loss.detach()), float(out.z_loss.detach())],
                                     dtype=torch.float64)
                stats_all.extend(out.moe_stats)
                for d in dispatchers:
                    window["a2a"] += d.profile.times.get("all_to_all", 0.0) + \
                        d.profile.times.get("counts_exchange", 0.0)
                if micro == t.grad_accum_steps - 1 and t.zero_stage == 0 and t.precision == "fp32":
                    grad_norm = clip_gradients_(module, ctx, t.clip_grad)
                    if not math.isfinite(grad_norm):
                        # Skip the update (as ZeRO-1/2 and fp16 loss scaling do): AdamW leaves params without
                        # a grad untouched, so one bad batch does not turn every weight into NaN.
                        for p in module.parameters():
                            p.grad = None
                engine.step()
            if not (t.zero_stage == 0 and t.precision == "fp32"):
                gn = engine.get_global_grad_norm()
                grad_norm = float(gn) if gn is not None else float("nan")
            step += 1
            consumed += t.global_batch_size
            if progress is not None:
                progress.update(1)
            window["steps"] += 1
            window["tokens"] += t.global_batch_size * t.seq_len
            sums /= t.grad_accum_steps
            if ctx.dp_group is not None:
                dist.all_reduce(sums, group=ctx.dp_group)
                sums /= ctx.dp_size
            # Same decision on every rank: sums are DP-reduced and the grad norm is global.
            overflow_skip = t.precision == "fp16" and ds.skipped_steps(engine) > skipped_before
            if guard.update(float(sums[0]), grad_norm, overflow_skip):
                rank0_print(f"WARNING: non-finite loss {float(sums[0])} / grad norm {grad_norm} at step {step} "
                            f"({guard.in_a_row} in a row; the run stops at train.max_nonfinite_steps="
                            f"{t.max_nonfinite_steps})")
                if guard.should_stop:
                    good = ckpt.complete_steps()
                    rank0_print(f"stopping: {guard.in_a_row} non-finite steps in a row (loss or gradients are NaN/Inf; "
                                f"lower train.lr, raise train.warmup_steps or check the data); no checkpoint was "
                                f"written from the non-finite state; the last good checkpoint is "
                                + (os.path.join(t.save_dir, step_dirname(good[-1])) if good else "(none saved yet)"))
                    logger.log(step, {"loss": float(sums[0]), "lm_loss": float(sums[1]), "grad_norm": grad_norm,
                                      "nonfinite_in_a_row": guard.in_a_row})
                    logger.close()
                    return EXIT_NONFINITE
            log_now = step % t.log_interval == 0 or step == t.train_steps
            if log_now:
                elapsed = time.perf_counter() - window["t0"]
                tok_s = window["tokens"] / max(elapsed, 1e-9)
                tflops = 3 * flops_tok * tok_s / 1e12 / ctx.world_size
                m = {"loss": float(sums[0]), "lm_loss": float(sums[1]), "aux_loss": float(sums[2]),
                     "z_loss": float(sums[3]), "lr": engine.lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                     "loss_scale": ds.engine_loss_scale(engine) if t.precision == "fp16" else None,
                     "tokens_per_s": tok_s, "step_time_s": elapsed / max(window["steps"], 1),
                     "all_to_all_s": window["a2a"] / max(window["steps"], 1), "tflops": tflops,
                     "mfu": tflops / peak if peak else None, "consumed_samples": consumed,
                     "skipped_steps": ds.skipped_steps(engine)}
                if stats_all:
                    m.update(summarize(stats_all, threshold))
                    for i, st in enumerate(out.moe_stats):
                        m[f"moe/layer{i}/tokens_per_expert_max"] = int(st.kept.max())
                        m[f"moe/layer{i}/tokens_per_expert_min"] = int(st.kept.min())
                logger.log(step, {k: v for k, v in m.items() if v is not None})
                if rank0:
                    out_line(format_line(step, t.train_steps, m))
                window = {"t0": time.perf_counter(), "steps": 0, "tokens": 0, "a2a": 0.0}
            if valid_ds is not None and ((t.eval_interval and step % t.eval_interval == 0) or step == t.train_steps):
                val = evaluate()
                last_val = val
                logger.log(step, {"val/lm_loss": val, "val/ppl": math.exp(min(val, 50))})
                if rank0:
                    out_line(f"validation at step {step}: lm loss {val:.4f} | perplexity {math.exp(min(val, 50)):.2f}")
            exiting = bool(t.exit_interval) and step - start_step >= t.exit_interval and step < t.train_steps
            if (t.save_interval and step % t.save_interval == 0) or step == t.train_steps or exiting:
                if guard.clean:
                    save()
                else:
                    rank0_print(f"not saving a checkpoint at step {step}: it is non-finite; the last good one is kept")
            if exiting:
                rank0_print(f"exit_interval {t.exit_interval} reached at step {step}: stopping; relaunch to resume")
                break
        if progress is not None:
            progress.close()
        if start_step >= t.train_steps:
            rank0_print(f"the checkpoint in {t.save_dir} is already at train_steps={t.train_steps}: nothing to train "
                        f"(raise --train.train_steps to continue, or use another run_dir)")
        if last_val is None and valid_ds is not None:
            last_val = evaluate()
        final = {"final/val_ppl": math.exp(min(last_val, 50)) if last_val is not None else None}
        if val_routing:
            routing = metrics.routing_report(val_routing["selections"], val_routing["divergence"], threshold)
            final.update({f"final/{k}": routing[k] for k in ("activation_ratio", "effective_experts", "divergence")})
            if rank0:
                write_json_atomic(os.path.join(cfg.run_dir, "moe_stats.json"), routing)
        elif stats_all:
            final["final/activation_ratio"] = summarize(stats_all, threshold)["moe/activation_ratio"]
        if step > start_step:
            final["final/tokens_per_s"] = (step - start_step) * t.global_batch_size * t.seq_len / max(
                time.perf_counter() - loop_t0, 1e-9)
        final["final/step"] = step
        logger.summary({k: v for k, v in final.items() if v is not None})
        if rank0:
            write_json_atomic(os.path.join(cfg.run_dir, "summary.json"),
                              {k.split("/", 1)[1]: v for k, v in final.items() if v is not None})
            print("=" * 80)
            if last_val is not None:
                print(f"final validation perplexity: {math.exp(min(last_val, 50)):.2f}")
            if "final/activation_ratio" in final:
                print(f"expert activation ratio: {final['final/activation_ratio']:.3f} "
                      f"(share >= {threshold} x 1/E, over layers x experts)")
            if "final/effective_experts" in final:
                print(f"effective experts per layer (exp entropy of shares): {final['final/effective_experts']:.2f}; "
                      f"distinct experts per token: {final['final/divergence']:.2f}")
                print(f"routing report: {os.path.abspath(os.path.join(cfg.run_dir, 'moe_stats.json'))}")
            print(f"checkpoints: {os.path.abspath(t.save_dir)}")
            print(f"metrics: {os.path.abspath(os.path.join(cfg.run_dir, 'metrics.jsonl'))}")
            if logger.wandb_path:
                print(f"wandb files: {os.path.dirname(os.path.abspath(logger.wandb_path))}")
            print("=" * 80, flush=True)
        logger.close()
        return 0


def _load_optimizer(engine, module, ctx, state: dict) -> None:
    """Optimizer + LR scheduler from a rank's checkpoint state (after the model weights).

    The native partition when present (exact resume); else the universal per-parameter state that
    tools/reshard_checkpoint.py writes for a new layout (collective: every rank takes the same branch).
    """
    from megatron_mhmoe.runtime import universal
    from megatron_mhmoe.runtime.checkpoint import CheckpointError
    opt = engine.optimizer
    if "optimizer" in state:
        if engine.zero_optimization():
            # ZeRO wants the list of every DP rank's state; each rank only reads its own entry.
            opt.load_state_dict([state["optimizer"]] * engine.dp_world_size, load_from_fp32_weights=True)
        else:
            opt.load_state_dict(state["optimizer"])
        engine.lr_scheduler.load_state_dict(state["scheduler"])
    elif "universal" in state:
        universal.restore(engine, module, ctx, state["universal"])
        engine.lr_scheduler.load_state_dict(state["scheduler"])
        universal.sync_lr_from_scheduler(engine)
        rank0_print("optimizer state restored from the universal per-parameter copy (resharded checkpoint)")
    else:
        raise CheckpointError("checkpoint has neither a native optimizer partition nor universal optimizer "
                              "state: it cannot resume training (re-export it with tools/reshard_checkpoint.py "
                              "from a checkpoint that has one)")


def _peak_tflops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS_BF16.items():
        if key in name:
            return value
    return None


class NonFiniteGuard:
    """Counts non-finite steps in a row (loss or global grad norm NaN/Inf).

    An fp16 step that DeepSpeed's dynamic loss scaler skipped for overflow (finite loss, inf grad norm) is
    loss-scale calibration, not a non-finite step, and does not count. `clean` is False while the latest
    step was non-finite: no checkpoint is written from such a state.
    """

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self.in_a_row = 0
        self.total = 0
        self.overflow_skips = 0

    def update(self, loss: float, grad_norm: float, overflow_skip: bool = False) -> bool:
        """Record one step; True if it was non-finite."""
        if math.isfinite(loss) and (math.isfinite(grad_norm) or overflow_skip):
            self.overflow_skips += int(overflow_skip)
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        return True

    @property
    def should_stop(self) -> bool:
        return self.in_a_row >= self.limit

    @property
    def clean(self) -> bool:
        return self.in_a_row == 0


if __name__ == "__main__":
    sys.exit(main())
