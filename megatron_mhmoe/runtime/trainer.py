"""The Trainer: build, resume, train_step, evaluate, save, and a loop that fits a screen.

Per optimizer step (`train_step`):
1. grad_accum micro-batches of this DP rank's share of the global batch, each moved to `engine.device`:
   forward, engine.backward;
2. engine.step: the engine clips with the global norm (each expert counted once) and skips the update
   of a non-finite step (runtime/engine.py);
3. the step's loss sums are reduced over DP on the engine's device (parallel.comm).
The loop logs every log_interval (metrics line, wandb, routing statistics), evaluates every
eval_interval and writes an atomic checkpoint every save_interval (never from a non-finite step).

`device_guard=True` (tests: MHMOE_DEVICE_GUARD=1) runs every step under parallel.host_tensor's guard:
batches arrive as host tensors and any tensor that skips the engine's device fails as it would on a GPU.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

import torch

from megatron_mhmoe import atomic
from megatron_mhmoe.data import build_train_valid_test_datasets, make_batch_iterator
from megatron_mhmoe.data.builtin_data import prepare_builtin_data
from megatron_mhmoe.data.tokenizer import build_tokenizer
from megatron_mhmoe.model.gpt import GPTModel
from megatron_mhmoe.moe import metrics, routing_stats, sizing
from megatron_mhmoe.moe.balancing import MoEBalancing
from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.host_tensor import as_host, host_tensor_guard, plain
from megatron_mhmoe.runtime import faults, universal
from megatron_mhmoe.runtime.checkpoint import (CheckpointError, Checkpointer, CheckpointLayout, estimate_rank_bytes,
                                               model_mismatch, resume_changes, resume_record, rng_state,
                                               set_rng_state, step_dirname, steps_below_checkpoint)
from megatron_mhmoe.runtime.device_peaks import current_device_peak
from megatron_mhmoe.runtime.engine import Engine, checkpoint_safe_globals
from megatron_mhmoe.runtime.exit_codes import EXIT_NONFINITE
from megatron_mhmoe.runtime.logging import MetricsLogger, Progress, format_line, redact, run_summary
from megatron_mhmoe.runtime.run_config import RunConfig
from megatron_mhmoe.runtime.run_lock import effective_save_dir
from megatron_mhmoe.runtime.schedule import make_lr_lambda, resume_schedule_rule
from megatron_mhmoe.step_spans import span

DEVICE_GUARD_ENV = "MHMOE_DEVICE_GUARD"


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


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config_path: Optional[str] = None, device_guard: Optional[bool] = None):
        self.cfg = cfg
        self.ds_config_path = ds_config_path
        self.device_guard = bool(os.environ.get(DEVICE_GUARD_ENV)) if device_guard is None else device_guard
        self.callbacks = faults.step_callbacks()
        self.step, self.consumed, self.wandb_id = 0, 0, None
        self.val_routing: dict = {}
        self.stats_reference = False
        """Compute the routing statistics the old way, in every forward of every step, summed over TP per
        layer (the MoE layers' stats_mode 'eager'): the reference the tests compare the deferred path with."""
        self.resume_line = ""  # printed after the run summary (or folded into the nothing-to-train line)

    def print0(self, *a, **k) -> None:
        if self.ctx.rank == 0:
            print(*a, **k, flush=True)

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        """Process groups, data, model, engine, checkpointer (collective)."""
        cfg, t = self.cfg, self.cfg.train
        self.ctx = ctx = ParallelContext.from_world(cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.sequence_parallel,
                                                    timeout_s=cfg.parallel.timeout_s)
        t.save_dir = effective_save_dir(cfg.run_dir, t.save_dir)
        self.train_ds, self.valid_ds, self.tokenizer = self._data()
        # Same seed on a TP group (replicated activations, dropout masks), different per DP replica.
        torch.manual_seed(t.seed + 1000 * ctx.dp_rank)
        model = GPTModel(cfg.model, ctx, seed=t.seed)
        model.activation_checkpointing = t.activation_checkpointing
        self.flops_per_token = sizing.flops_per_token(cfg.model, t.seq_len)
        self.param_counts = model.num_params()
        base = None
        if self.ds_config_path:
            with open(self.ds_config_path) as f:
                base = json.load(f)
        self.attach(ctx, Engine(model, cfg, ctx, make_lr_lambda(t), base))
        layout = CheckpointLayout(ctx.world_size, ctx.tp_size, ctx.ep_size, t.zero_stage, t.precision)
        self.ckpt = Checkpointer(t.save_dir, ctx, layout, t.keep_last, log=self.print0,
                                 safe_globals=checkpoint_safe_globals())
        # A folder that cannot take a checkpoint would otherwise fail only at the first save, after the compute.
        self.ckpt.check_dir(estimate_rank_bytes(self.module, ctx.dp_size, ctx.edp_size, t.zero_stage, t.precision))
        self.threshold = cfg.model.moe.activation_threshold if cfg.model.moe else 0.5
        self.peak_tflops = current_device_peak()

    def attach(self, ctx: ParallelContext, engine: Engine) -> None:
        """The parts train_step needs: enough for tests that drive train_step with their own batches."""
        self.ctx, self.engine, self.module = ctx, engine, engine.module
        self.dispatchers = [m.dispatcher for m in self.module.modules() if hasattr(m, "dispatcher")]
        self.moe_layers = [m for m in self.module.modules() if hasattr(m, "stats_mode")]
        self.balancing = MoEBalancing(self.module, ctx)

    def _prepared_builtin_data(self) -> tuple[str, str]:
        data_dir = os.path.join(os.path.dirname(os.path.abspath(self.cfg.run_dir)), "builtin_data")
        vocab = min(self.cfg.model.vocab_size, 4096)
        out = None
        for turn in (0, 1):  # rank 0 prepares; the others then find it ready
            if (self.ctx.rank == 0) == (turn == 0):
                out = prepare_builtin_data(data_dir, vocab_size=vocab)
            comm.barrier()
        return out

    def _data(self):
        cfg, t, ctx = self.cfg, self.cfg.train, self.ctx
        if not cfg.data.data_path:
            prefix, tok = self._prepared_builtin_data()
            cfg.data.data_path, cfg.data.tokenizer_model = [prefix], tok
        tokenizer = None
        if cfg.data.tokenizer_model:  # checked before launch (train.py: data/vocab.check_training_tokenizer)
            tokenizer = build_tokenizer("auto", cfg.data.tokenizer_model)
        evals = (t.train_steps // max(1, t.eval_interval) + 2) * t.eval_iters * t.micro_batch_size * ctx.dp_size
        data_path = cfg.data.data_path if len(cfg.data.data_path) > 1 else cfg.data.data_path[0]
        log = (lambda m: print(f"[data] {m}", file=sys.stderr, flush=True)) if ctx.rank == 0 else (lambda m: None)
        eval_seed = t.seed if cfg.data.eval_seed is None else cfg.data.eval_seed

        def build(seed: int, sizes: tuple):
            return build_train_valid_test_datasets(
                data_path, cfg.data.split, t.seq_len, seed, sizes, cache_dir=cfg.data.cache_dir or None,
                model_vocab_size=cfg.model.vocab_size, log=log)

        train_ds = valid_ds = None
        for turn in (0, 1):  # rank 0 builds (and caches) the indices first; the others then read the cache
            if (ctx.rank == 0) == (turn == 0):
                if eval_seed == t.seed:
                    train_ds, valid_ds, _ = build(t.seed, (t.train_steps * t.global_batch_size, evals, 0))
                else:
                    train_ds = build(t.seed, (t.train_steps * t.global_batch_size, 0, 0))[0]
                    valid_ds = build(eval_seed, (0, evals, 0))[1]
            comm.barrier()
        return train_ds, valid_ds, tokenizer

    def _print_header(self) -> None:
        """A short summary on the console; the whole (redacted) config in <run_dir>/config.json."""
        cfg, ctx = self.cfg, self.ctx
        if ctx.rank != 0:
            return
        path = os.path.join(cfg.run_dir, "config.json")
        os.makedirs(cfg.run_dir, exist_ok=True)
        atomic.write_json(path, redact(cfg.to_dict()))
        for line in run_summary(cfg, ctx, self.param_counts, self.flops_per_token, path):
            print(line)
        if self.resume_line:
            print(self.resume_line)
        sys.stdout.flush()

    @property
    def eod(self) -> Optional[int]:
        return self.tokenizer.eod if self.tokenizer is not None else None

    def _batches(self, dataset, grad_accum: int, consumed: int):
        """This DP rank's micro-batches; host tensors under the device guard (they must be moved)."""
        it = make_batch_iterator(dataset, self.cfg.train.micro_batch_size, grad_accum, self.ctx.dp_rank,
                                 self.ctx.dp_size, consumed, eod=self.eod)
        for b in it:
            yield {k: as_host(v) for k, v in b.items()} if self.device_guard else b

    # ------------------------------------------------------------------ checkpoints
    def resume(self) -> None:
        """Load the newest valid checkpoint, if any (collective)."""
        t = self.cfg.train
        loaded = self.ckpt.load_latest() if t.resume else None
        if loaded is None:
            return
        step, state, manifest = loaded
        eng = self.engine
        folder = os.path.join(t.save_dir, step_dirname(step))
        saved = manifest.get("resume_settings")
        if saved is None:
            self.print0(f"note: checkpoint {folder} predates the record of data and routing settings: resuming "
                        f"without comparing them with this run's")
        else:
            changes = resume_changes(saved, resume_record(self.cfg.to_dict()))
            if changes and not t.allow_changed_resume:
                raise CheckpointError(
                    f"checkpoint {folder} was trained with other data or routing settings than this run: "
                    f"{'; '.join(changes)}. Relaunch with the saved values (its manifest.json has them), or pass "
                    f"--train.allow_changed_resume=true to continue anyway (the data position carries over in "
                    f"samples, the sample order is redrawn), or start fresh with another train.save_dir")
            if changes:
                self.print0(f"WARNING: resuming with changed settings (train.allow_changed_resume=true): "
                            f"{'; '.join(changes)}")
            if manifest.get("train_samples") not in (None, t.train_steps * t.global_batch_size):
                # The train set's shuffle is drawn for its size: another size is another sample order.
                self.print0(f"note: the train set now holds train_steps x global_batch_size = "
                            f"{t.train_steps * t.global_batch_size} samples, the checkpoint's held "
                            f"{manifest['train_samples']}: training continues at sample "
                            f"{int(state['consumed_samples'])} of a reshuffled order")
        if step > t.train_steps:  # train.py checks `latest` before launch; the same message for direct users
            raise CheckpointError(steps_below_checkpoint(t.save_dir, step, t.train_steps))
        need = int(state["consumed_samples"]) + max(0, t.train_steps - step) * t.global_batch_size
        if need > len(self.train_ds):  # the sampler would stop short of train_steps (StopIteration mid-run)
            raise CheckpointError(
                f"checkpoint {folder} has consumed {int(state['consumed_samples'])} samples; the "
                f"{t.train_steps - step} steps left to train.train_steps={t.train_steps} at global batch "
                f"{t.global_batch_size} need {need}, but the train set holds {len(self.train_ds)} (train_steps x "
                f"global_batch_size): resume with the saved global batch (a smaller one cannot finish this run), or "
                f"start fresh with another train.save_dir")
        problem = model_mismatch(eng.model_state_dict(), state["model"],
                                 (manifest.get("config") or {}).get("model"), self.cfg.to_dict()["model"])
        if problem:
            raise CheckpointError(f"checkpoint {folder} holds a different model "
                                  f"than this config: {problem}. Launch with the config it was trained with (saved "
                                  f"in its manifest.json), or start fresh in another run_dir (or --train.resume=false)")
        eng.load_model_state_dict(state["model"])
        if "optimizer" in state:  # the native partition: exact resume
            eng.load_optimizer_state_dict(state["optimizer"])
            eng.lr_scheduler.load_state_dict(state["scheduler"])
        elif "universal" in state:  # written by tools/reshard_checkpoint.py for a new layout
            eng.lr_scheduler.load_state_dict(state["scheduler"])
            universal.restore(eng, self.module, self.ctx, state["universal"])
            self.print0("optimizer state restored from the universal per-parameter copy (resharded checkpoint)")
        else:
            raise CheckpointError("checkpoint has neither a native optimizer partition nor universal optimizer "
                                  "state: it cannot resume training (re-export it with tools/reshard_checkpoint.py "
                                  "from a checkpoint that has one)")
        saved_steps = ((manifest.get("config") or {}).get("train") or {}).get("train_steps")
        if saved_steps is not None and int(saved_steps) != t.train_steps:
            self._apply_resume_schedule(int(saved_steps))
        set_rng_state(state["rng"])
        self.step, self.consumed = step, int(state["consumed_samples"])
        self.wandb_id = manifest.get("wandb_id")
        eng.global_steps = step
        self.resume_line = f"resumed from {t.save_dir} at step {step} ({self.consumed} samples consumed)"

    def _apply_resume_schedule(self, saved_steps: int) -> None:
        """train_steps changed since the checkpoint: apply train.resume_schedule (runtime/schedule.py) from the
        next step on (the loaded optimizer holds the saved schedule's lr for it), and say so with both lrs."""
        sched = self.engine.lr_scheduler
        total, note = resume_schedule_rule(self.cfg.train, sched.last_epoch, saved_steps)
        sched.lr_lambdas = [make_lr_lambda(self.cfg.train, total) for _ in sched.lr_lambdas]
        sched._last_lr = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(sched.optimizer.param_groups, sched._last_lr):
            group["lr"] = lr
        self.print0(note)

    def save(self) -> str:
        """An atomic checkpoint of every rank (collective)."""
        eng = self.engine
        state = {"model": eng.model_state_dict(), "optimizer": eng.optimizer_state_dict(),
                 "scheduler": eng.lr_scheduler.state_dict(), "rng": rng_state(),
                 "consumed_samples": self.consumed, "step": self.step}
        # Per-parameter optimizer state for tools/reshard_checkpoint.py (runtime/universal.py).
        uni = universal.collect(eng, self.module, self.ctx, self.cfg.model)
        if uni is not None:
            state["universal"] = uni
        t = self.cfg.train
        return self.ckpt.save(self.step, plain(state), {"wandb_id": self.logger.run_id, "config": redact(self.cfg.to_dict()),
                                                 "consumed_samples": self.consumed, "universal": uni is not None,
                                                 "resume_settings": resume_record(self.cfg.to_dict()),
                                                 "train_samples": t.train_steps * t.global_batch_size})

    # ------------------------------------------------------------------ steps
    def _reduce_mean_over_dp(self, x: torch.Tensor) -> torch.Tensor:
        comm.all_reduce_(x, self.ctx.dp_group)
        return x / self.ctx.dp_size

    def _set_stats_mode(self, mode: str) -> None:
        for layer in self.moe_layers:
            layer.stats_mode = mode

    def is_log_step(self, step: int, start_step: int = 0) -> bool:
        """Whether the loop logs after `step` (log_interval, the last step, the exit_interval step)."""
        t = self.cfg.train
        return step % t.log_interval == 0 or step == t.train_steps or \
            (bool(t.exit_interval) and step - start_step >= t.exit_interval)

    def train_step(self, batches, log: bool = True) -> dict:
        """One optimizer step over grad_accum micro-batches; DP-mean losses, grad norm, routing stats.

        log=False: a step the loop does not log. Its MoE layers skip the routing statistics (stats_mode
        'off', moe/routing_stats.py); a logged step computes them on the device and sums them over TP once,
        for all layers and micro-batches, after the last backward."""
        self._set_stats_mode("eager" if self.stats_reference else "deferred" if log else "off")
        try:
            with host_tensor_guard(self.device_guard):
                result, sums, stats, routing = self._step(batches, log)
        finally:
            self._set_stats_mode("eager")  # other callers of the model (evaluation, tests) get the reference
        loss, lm, aux, z, seq_aux, global_aux = sums.tolist()
        return {"loss": loss, "lm_loss": lm, "aux_loss": aux, "z_loss": z, "seq_aux_loss": seq_aux,
                "global_aux_loss": global_aux, "grad_norm": result.grad_norm, "skipped": result.skipped,
                "moe_stats": stats, **routing}

    def _step(self, batches, log: bool):
        """train_step's work: (engine step result, (6,) DP-mean loss sums, the MoE stats, the step's counts)."""
        t, eng = self.cfg.train, self.engine
        sums = torch.zeros(6, dtype=torch.float64, device=eng.device)  # loss, lm, aux, z, seq aux, global aux
        stats = []
        self.balancing.begin_step()
        for micro in range(t.grad_accum_steps):
            b = eng.to_device(next(batches))
            out = eng(b["tokens"], labels=b["labels"], loss_mask=b["loss_mask"])
            loss = out.loss
            for cb in self.callbacks:  # tests only (MHMOE_FAULT): die/hang mid-step, poison the loss
                loss = cb.after_forward(self.step + 1, micro, self.ctx.rank, loss)
            with span("backward"):
                eng.backward(loss)
            with span("step_reduce"):
                zero = out.z_loss.new_zeros(())
                sums += torch.stack([loss.detach(), out.lm_loss.detach(), out.aux_loss.detach(), out.z_loss.detach(),
                                     sum((st.seq_aux_loss.detach() for st in out.moe_stats), zero),
                                     sum((st.global_aux_loss.detach() for st in out.moe_stats), zero)]
                                    ).to(torch.float64)
                stats.extend(out.moe_stats)
                self.balancing.after_backward(out.moe_stats)
        with span("optimizer"):
            result = eng.step()
        with span("step_reduce"):
            sums = self._reduce_mean_over_dp(sums / t.grad_accum_steps)
        with span("moe/statistics"):
            if log:  # the routing statistics of every layer and micro-batch: one all-reduce over TP
                routing_stats.reduce_pending(stats, self.ctx.tp_group)
            # The step's routed and kept counts (and the balancing biases' update): one all-reduce.
            routing = self.balancing.after_step(stats, t.grad_accum_steps, applied=not result.skipped, log=log)
        return result, sums, stats, routing

    def evaluate(self) -> float:
        """Validation LM loss over eval_iters micro-batches; keeps the validation routing in val_routing."""
        t, eng = self.cfg.train, self.engine
        eng.eval()
        with host_tensor_guard(self.device_guard), torch.no_grad():
            it = self._batches(self.valid_ds, 1, 0)
            total = torch.zeros(2, dtype=torch.float64, device=eng.device)  # sum of token losses, tokens
            acc = None
            for _ in range(t.eval_iters):
                b = next(it, None)
                if b is None:
                    break
                b = eng.to_device(b)
                out = eng(b["tokens"], labels=b["labels"], loss_mask=b["loss_mask"])
                n = b["loss_mask"].sum().double()
                total += torch.stack([out.lm_loss.detach().double() * n, n])
                if out.moe_stats:
                    # (L, E) selections, (L, h*k+1) divergence, (L, E) kept, (L, h*E) head x expert,
                    # (L, h*k+1) fan-out over groups and over EP ranks
                    cur = [torch.stack([getattr(st, a).double().reshape(-1) for st in out.moe_stats])
                           for a in ("selections", "divergence", "kept", "head_counts", "fanout_groups",
                                     "fanout_ranks")]
                    acc = cur if acc is None else [x + y for x, y in zip(acc, cur)]
            comm.all_reduce_(total, self.ctx.dp_group)
            if acc is not None:
                for x in acc:
                    comm.all_reduce_(x, self.ctx.dp_group)
                L, h = acc[0].shape[0], self.cfg.model.moe.num_heads
                self.val_routing.update(selections=acc[0].cpu(), divergence=acc[1].cpu(), kept=acc[2].cpu(),
                                        head_counts=acc[3].cpu().view(L, h, -1), fanout_groups=acc[4].cpu(),
                                        fanout_ranks=acc[5].cpu())
            total = total.tolist()
        eng.train()
        return total[0] / max(total[1], 1.0)

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        self.build()
        # Resume, logging, metrics and the final report run under the guard too (train_step and evaluate
        # enter it themselves); the build does not: parameters are made on the host and moved by DeepSpeed.
        with host_tensor_guard(self.device_guard):
            self.resume()
            if self.step < self.cfg.train.train_steps:
                self._print_header()
            return self._loop()

    def _loop(self) -> int:
        cfg, t, ctx = self.cfg, self.cfg.train, self.ctx
        rank0 = ctx.rank == 0
        self.logger = MetricsLogger(cfg.run_dir, cfg.wandb, cfg.to_dict(), rank0,
                                    run_name=os.path.basename(os.path.abspath(cfg.run_dir)), resume_id=self.wandb_id,
                                    tensorboard_cfg=cfg.tensorboard)
        self.logger.catch_up(self.step)  # a killed launch's rows wandb never got; none past the checkpoint
        batches = self._batches(self.train_ds, t.grad_accum_steps, self.consumed)
        quiet = self.step >= t.train_steps  # a relaunch with nothing to train says so in one line
        progress = Progress(t.train_steps, self.step, t.progress_interval_s) if rank0 and not quiet else None
        out_line = progress.line if progress is not None else print
        window = _Window()
        guard = NonFiniteGuard(t.max_nonfinite_steps)
        last_val, start_step, loop_t0, r = None, self.step, time.perf_counter(), {"moe_stats": []}
        while self.step < t.train_steps:
            r = self.train_step(batches, log=self.is_log_step(self.step + 1, start_step))
            self.step += 1
            self.consumed += t.global_batch_size
            if progress is not None:
                progress.update(self.step)
            window.add(t.global_batch_size * t.seq_len)
            overflow_skip = t.precision == "fp16" and r["skipped"]
            if guard.update(r["loss"], r["grad_norm"], overflow_skip):
                self.print0(f"WARNING: non-finite loss {r['loss']} / grad norm {r['grad_norm']} at step {self.step} "
                            f"({guard.in_a_row} in a row; the run stops at train.max_nonfinite_steps="
                            f"{t.max_nonfinite_steps})")
                if guard.should_stop:
                    return self._stop_nonfinite(guard, r)
            if self.step % t.log_interval == 0 or self.step == t.train_steps:
                m = self._metrics(r, window)
                self.logger.log(self.step, {k: v for k, v in m.items() if v is not None})
                if rank0:
                    out_line(format_line(self.step, t.train_steps, m, progress.eta_s() if progress else None))
                window = _Window()
            if self.valid_ds is not None and ((t.eval_interval and self.step % t.eval_interval == 0)
                                              or self.step == t.train_steps):
                last_val = self.evaluate()
                ppl = math.exp(min(last_val, 50))
                self.logger.log(self.step, {"val/lm_loss": last_val, "val/ppl": ppl})
                if rank0:
                    out_line(f"validation at step {self.step}: lm loss {last_val:.4f} | perplexity {ppl:.2f}")
            exiting = bool(t.exit_interval) and self.step - start_step >= t.exit_interval and self.step < t.train_steps
            if (t.save_interval and self.step % t.save_interval == 0) or self.step == t.train_steps or exiting:
                if guard.clean:
                    self.save()
                else:
                    self.print0(f"not saving a checkpoint at step {self.step}: it is non-finite; the last good one "
                                f"is kept")
            if exiting:
                self.print0(f"exit_interval {t.exit_interval} reached at step {self.step}: stopping; relaunch to resume")
                break
        if progress is not None:
            progress.close()
        if quiet:
            self.print0(f"nothing to train: the checkpoint in {t.save_dir} is already at train_steps="
                        f"{t.train_steps} (raise --train.train_steps to continue, or use another run_dir)")
        if last_val is None and self.valid_ds is not None:
            last_val = self.evaluate()
        self._finish(last_val, r["moe_stats"], start_step, loop_t0, report=not quiet)
        return 0

    # ------------------------------------------------------------------ reporting
    def _metrics(self, r: dict, window: "_Window") -> dict:
        t, eng = self.cfg.train, self.engine
        elapsed = window.elapsed()
        # Device events on CUDA, read once per log line (the wait is for work already queued).
        a2a = sum(times.get("all_to_all", 0.0) + times.get("counts_exchange", 0.0)
                  for times in (d.take_times() for d in self.dispatchers))
        tok_s = window.tokens / max(elapsed, 1e-9)
        tflops = 3 * self.flops_per_token * tok_s / 1e12 / self.ctx.world_size
        m = {"loss": r["loss"], "lm_loss": r["lm_loss"], "aux_loss": r["aux_loss"], "z_loss": r["z_loss"],
             "seq_aux_loss": r.get("seq_aux_loss", 0.0), "global_aux_loss": r.get("global_aux_loss", 0.0),
             "lr": eng.lr, "grad_norm": r["grad_norm"], "loss_scale": eng.loss_scale, "tokens_per_s": tok_s,
             "step_time_s": elapsed / max(window.steps, 1), "all_to_all_s": a2a / max(window.steps, 1),
             "tflops": tflops, "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
             "consumed_samples": self.consumed, "skipped_steps": eng.skipped_steps}
        m.update(self.balancing.metrics())
        if r["moe_stats"]:
            m.update(metrics.summarize(r["moe_stats"], self.threshold, r.get("step_kept"), r.get("step_selections")))
            for i, st in enumerate(r["moe_stats"][:len(r["moe_stats"]) // t.grad_accum_steps]):
                kept = [int(n) for n in st.kept.tolist()]  # the step's first micro-batch, every expert
                # Not under moe/: readers treat every moe/ value as one number (tests/reliability/test_numerics.py).
                m[f"routing/layer{i}/tokens_per_expert"] = kept
                m[f"moe/layer{i}/tokens_per_expert_max"] = max(kept)
                m[f"moe/layer{i}/tokens_per_expert_min"] = min(kept)
                if r.get("step_kept") is not None:  # the whole step: micro-batches and DP (global MaxVio's loads)
                    m[f"routing/layer{i}/tokens_per_expert_step"] = [int(n) for n in r["step_kept"][i].tolist()]
        return m

    def _stop_nonfinite(self, guard: NonFiniteGuard, r: dict) -> int:
        t = self.cfg.train
        good = self.ckpt.complete_steps()
        self.print0(f"stopping: {guard.in_a_row} non-finite steps in a row (loss or gradients are NaN/Inf; lower "
                    f"train.lr, raise train.warmup_steps or check the data); no checkpoint was written from the "
                    f"non-finite state; the last good checkpoint is "
                    + (os.path.join(t.save_dir, step_dirname(good[-1])) if good else "(none saved yet)"))
        self.logger.log(self.step, {"loss": r["loss"], "lm_loss": r["lm_loss"], "grad_norm": r["grad_norm"],
                                    "nonfinite_in_a_row": guard.in_a_row})
        self.logger.close()
        return EXIT_NONFINITE

    def _finish(self, last_val: Optional[float], stats: list, start_step: int, loop_t0: float,
                report: bool = True) -> None:
        cfg, t = self.cfg, self.cfg.train
        final = {"final/val_ppl": math.exp(min(last_val, 50)) if last_val is not None else None}
        if self.step > start_step:  # the loop's time (steps, evaluations, saves), not the report written below
            final["final/tokens_per_s"] = (self.step - start_step) * t.global_batch_size * t.seq_len / max(
                time.perf_counter() - loop_t0, 1e-9)
        if self.val_routing:
            vr = self.val_routing
            routing = metrics.routing_report(vr["selections"], vr["divergence"], self.threshold,
                                             vr.get("head_counts"), vr.get("kept"), vr.get("fanout_groups"),
                                             vr.get("fanout_ranks"))
            final.update({f"final/{k}": routing.get(k) for k in (
                "activation_ratio", "effective_experts", "divergence", "maxvio", "head_activation_ratio",
                "head_effective_experts", "mi_head_expert_bits", "fanout_groups_mean", "fanout_ranks_mean")})
            if self.ctx.rank == 0:
                atomic.write_json(os.path.join(cfg.run_dir, "moe_stats.json"), routing, sort_keys=True)
                if vr.get("head_counts") is not None:
                    metrics.write_head_heatmap(vr["head_counts"], os.path.join(cfg.run_dir, "head_expert_shares.png"))
        elif stats:
            final["final/activation_ratio"] = metrics.summarize(stats, self.threshold)["moe/activation_ratio"]
        final["final/step"] = self.step
        self.logger.summary({k: v for k, v in final.items() if v is not None})
        if self.ctx.rank == 0:
            atomic.write_json(os.path.join(cfg.run_dir, "summary.json"),
                              {k.split("/", 1)[1]: v for k, v in final.items() if v is not None}, sort_keys=True)
            if report:
                _print_final(cfg, final, last_val, self.threshold, self.logger)
        self.logger.close()


class _Window:
    """Tokens and steps since the last log line."""

    def __init__(self):
        self.t0, self.steps, self.tokens = time.perf_counter(), 0, 0

    def add(self, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _print_final(cfg: RunConfig, final: dict, last_val: Optional[float], threshold: float, logger) -> None:
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
    print(f"checkpoints: {os.path.abspath(cfg.train.save_dir)}")
    print(f"metrics: {os.path.abspath(os.path.join(cfg.run_dir, 'metrics.jsonl'))}")
    if logger.wandb_path:
        print(f"wandb files: {os.path.dirname(os.path.abspath(logger.wandb_path))}")
    print("=" * 80, flush=True)
