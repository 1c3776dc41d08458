"""Training entry point: `python -m megatron_mhmoe.train [--config F] [--deepspeed_config F] [--a.b=v ...]`.

Launched by `deepspeed`, `torchrun` or plain `python` (one process). Without data_path it trains on the
built-in corpus (this machine's Python stdlib), preparing it on first use.

This module is the command line: arguments, config, pre-flight checks (before any process group forms,
so a bad config never leaves peers waiting) and exit codes; runtime/trainer.py is the loop and
runtime/engine.py owns DeepSpeed and the device.

Rank 0 takes the run-folder lock (runtime/run_lock.py) after the pre-flight checks, before anything is
written; every exit path releases it. Ctrl-C is one line and exit 130 (runtime/interrupt.py, installed before
torch is imported).

Exit codes: 0 done; 1 an error while training (one `[rank R] error: ...` line); 2 a config/data error, found
before any process group forms, or a run folder in use by another run; 3 train.max_nonfinite_steps
non-finite steps in a row (the last good checkpoint is kept); 4 a collective failed or timed out (a peer rank
died or is stuck, after at most parallel.timeout_s), or the process group could not form; 5 a checkpoint
could not be written (save_dir not writable, too small or not shared between nodes, found before step 1, or a
write error mid-save; the previous checkpoint stays latest); 130 Ctrl-C. Tests inject faults with MHMOE_FAULT
(runtime/faults.py). The codes are named in runtime/exit_codes.py.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

if __name__ == "__main__":  # before torch is imported: a Ctrl-C during any import is one line too
    from megatron_mhmoe.runtime import interrupt as _interrupt
    _interrupt.install()

import torch

from megatron_mhmoe.launch.cli import parse_args, resolve_config
from megatron_mhmoe.runtime.exit_codes import (EXIT_CHECKPOINT_WRITE, EXIT_CONFIG, EXIT_ERROR,  # noqa: F401
                                                EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_PEER_FAILURE)
from megatron_mhmoe.runtime.logging import redact_text
from megatron_mhmoe.runtime.run_config import RunConfig, check_ds_config_agrees

def _single_process_env() -> None:
    """Plain `python -m megatron_mhmoe.train`: a one-rank group on loopback (DeepSpeed needs one)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    from megatron_mhmoe.parallel.spawn import free_port
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))




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
    from megatron_mhmoe.data.vocab import check_dataset_vocab, check_training_tokenizer
    parse_split(cfg.data.split)
    prefixes = []
    if cfg.data.data_path:
        prefixes, _ = parse_blend(cfg.data.data_path)
        for prefix in prefixes:
            if os.path.isdir(prefix):  # else the message would be about a "<folder>.bin" nobody meant
                raise DataError(f"data.data_path {prefix!r} is a folder, not a dataset prefix."
                                + _suggest_prefixes(prefix))
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise DataError(f"dataset file {prefix + ext} does not exist (data.data_path prefix {prefix!r})."
                                    + _suggest_prefixes(prefix))
            # Header, sizes and (from the .meta.json sidecar, free) the vocabulary: cheap, no token scan.
            check_dataset_vocab(IndexedDataset(prefix), cfg.model.vocab_size, scan_without_meta=False)
    if cfg.data.tokenizer_model:  # the one tokenizer check: exists, fits the model, made the data
        for note in check_training_tokenizer(cfg.data.tokenizer_model, prefixes, cfg.model.vocab_size,
                                             cfg.data.allow_tokenizer_mismatch):
            if os.environ.get("RANK", "0") == "0":
                print(f"warning: {note}", file=sys.stderr, flush=True)


def _check_resume_step(cfg: RunConfig) -> None:
    """A checkpoint already past train.train_steps: say so before launch (not as negative steps left)."""
    from megatron_mhmoe.runtime.checkpoint import latest_step, steps_below_checkpoint
    step = latest_step(cfg.train.save_dir) if cfg.train.resume else None
    if step is not None and step > cfg.train.train_steps:
        raise ValueError(steps_below_checkpoint(cfg.train.save_dir, step, cfg.train.train_steps))


def _locked_folders(cfg: RunConfig) -> list[str]:
    """run_dir, and train.save_dir when it lies outside run_dir."""
    run, save = os.path.abspath(cfg.run_dir), os.path.abspath(cfg.train.save_dir)
    return [run] if save == run or save.startswith(run.rstrip(os.sep) + os.sep) else [run, save]


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = resolve_config(args.config, overrides)
    except ValueError as e:
        print(f"config error: {redact_text(str(e))}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        from megatron_mhmoe.runtime.logging import redact
        print(json.dumps(redact(cfg.to_dict()), indent=1))
        return 0
    _single_process_env()
    world = int(os.environ["WORLD_SIZE"])
    from megatron_mhmoe.runtime import run_lock
    cfg.train.save_dir = run_lock.effective_save_dir(cfg.run_dir, cfg.train.save_dir)
    # Validate before joining the process group: a bad config must not leave peers waiting.
    try:
        armed = _check_before_launch(cfg, args.deepspeed_config, world)
    except ValueError as e:
        from megatron_mhmoe.data.errors import DataError
        print(f"{'data' if isinstance(e, DataError) else 'config'} error: {redact_text(str(e))}", file=sys.stderr)
        return EXIT_CONFIG
    if armed:
        print(armed, file=sys.stderr, flush=True)
    if os.environ.get("RANK", "0") == "0":  # before anything is written into the folders
        try:
            run_lock.acquire(_locked_folders(cfg), cfg.train.lock_stale_s,
                             lambda m: print(m, file=sys.stderr, flush=True))
        except run_lock.RunLockError as e:
            print(f"run folder error: {e}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
    return _train(cfg, args.deepspeed_config, world)


def _check_deepspeed_config(cfg: RunConfig, path: str) -> None:
    """A --deepspeed_config: readable JSON, agreeing with the run config, every key known to DeepSpeed."""
    if not os.path.exists(path):
        raise ValueError(f"--deepspeed_config {path!r} does not exist")
    with open(path) as f:
        try:
            ds_dict = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"--deepspeed_config {path} is not valid JSON: {err}")
    notes = check_ds_config_agrees(cfg, ds_dict, path)
    # Then every key against DeepSpeed's own schema (a misspelt one would be ignored).
    from megatron_mhmoe.runtime.ds_schema import check_ds_config_keys
    t = cfg.train  # batch fields DeepSpeed's parser needs (filled from the run config, as the engine does)
    check_ds_config_keys(ds_dict, path, {
        "train_micro_batch_size_per_gpu": t.micro_batch_size, "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps})
    for note in notes:
        if os.environ.get("RANK", "0") == "0":
            print(f"warning: {note}", file=sys.stderr, flush=True)


def _check_before_launch(cfg: RunConfig, deepspeed_config: Optional[str], world: int) -> Optional[str]:
    """Every check that needs no process group (ValueError/DataError with the fix); the armed fault's line."""
    from megatron_mhmoe.runtime import run_lock
    cfg.validate(world)
    # Before the model is built: a run_dir that is a file would fail only at the first write.
    run_lock.check_run_folders(cfg.run_dir, cfg.train.save_dir)
    _check_resume_step(cfg)
    if deepspeed_config:
        _check_deepspeed_config(cfg, deepspeed_config)
    _check_data_inputs(cfg)
    if cfg.tensorboard.enabled:
        import importlib.util
        if importlib.util.find_spec("tensorboard") is None:
            raise ValueError("tensorboard.enabled=true needs the tensorboard package: pip install tensorboard "
                             "(requirements-eval.txt), or drop --tensorboard.enabled")
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.precision=fp16 needs a GPU: DeepSpeed's CPU accelerator does not support fp16 "
                         "('Type fp16 is not supported on your device'); use bf16 or fp32 on CPU")
    from megatron_mhmoe.runtime import faults
    return faults.check()


def _train(cfg: RunConfig, deepspeed_config: Optional[str], world: int) -> int:
    """Join the process group and train; every failure ends the process with its exit code (see _leave)."""
    from megatron_mhmoe.runtime import engine, run_lock
    from megatron_mhmoe.runtime.trainer import Trainer
    rank = os.environ.get("RANK", "?")
    try:
        engine.init_distributed(cfg.parallel.timeout_s)
    except Exception as e:  # a peer that never arrives, a taken port, an unreachable master
        print(f"[rank {rank}] error: could not join the process group of {world} ranks at "
              f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within parallel.timeout_s="
              f"{cfg.parallel.timeout_s:g}s: {redact_text(_first_line(e))}", file=sys.stderr, flush=True)
        if os.environ.get("MHMOE_TRACEBACK"):
            run_lock.release_held()
            raise
        _leave(EXIT_PEER_FAILURE)
    try:
        code = Trainer(cfg, deepspeed_config).run()
    except Exception as e:
        from megatron_mhmoe.runtime.checkpoint import CheckpointWriteError
        if isinstance(e, CheckpointWriteError):  # its text may name a timeout-like errno: not a peer failure
            msg, exit_code = f"{type(e).__name__}: {e}", EXIT_CHECKPOINT_WRITE
        elif _is_comm_failure(e):
            msg, exit_code = _comm_failure_message(e, cfg), EXIT_PEER_FAILURE
        else:
            msg, exit_code = f"{type(e).__name__}: {e}", EXIT_ERROR
        print(f"[rank {rank}] error: {redact_text(msg)}", file=sys.stderr, flush=True)
        if os.environ.get("MHMOE_TRACEBACK"):
            run_lock.release_held()
            raise
        # Never dist.destroy_process_group() here: with a dead peer it can block; leave at once.
        _leave(exit_code)
    # gloo sometimes aborts in interpreter teardown after training: leave cleanly.
    try:
        from megatron_mhmoe.parallel import comm
        comm.leave_process_group()
    finally:
        _leave(code)


def _leave(code: int) -> None:
    """Release the run-folder lock, flush, and exit at once (no interpreter teardown: see main)."""
    from megatron_mhmoe.runtime import run_lock
    run_lock.release_held()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
