"""Evaluate a trained model with lm-eval-harness (the `lm-eval` package, Hugging Face backend), offline.

Examples:
  python tools/evaluate.py --model runs/quickstart/checkpoints --tasks local --out runs/quickstart/eval.json
  python tools/evaluate.py --model exported/quickstart-hf --tasks hellaswag,arc_easy   # harness tasks by name

--model is a checkpoint (step folder or save_dir), a tools/export_checkpoint.py folder or a tools/export_hf.py
folder; the first two are exported to a transformers folder first (tools/export_hf.py). --tasks takes
lm-eval task names (their datasets must be reachable or cached) and `local`: the two tasks shipped in
tools/eval_tasks/ that need no network:
  mhmoe_next_line     300 multiple-choice items (which of 4 lines of Python comes next; acc, acc_norm)
  mhmoe_heldout_ppl   rolling-window perplexity on held-out Python text (word/byte perplexity, bits per byte)
both from standard-library files after the part the built-in corpus trains on (tools/build_eval_task.py).
Results: the harness's numbers per task in --out (JSON), and a wandb run (offline unless configured; group
and name from --wandb-group / --wandb-name) unless --no-wandb.
Output (evaluation/progress.py): the harness's per-request "Truncating N tokens from the left" warnings become
one summary line; its progress bars become plain lines (at 25, 50, 75 and 100%) when stdout or stderr is not a
terminal; the git hash it records is this checkout's, looked up without git's "fatal: not a git repository"
noise.
"""
from __future__ import annotations

import os
import sys
import tempfile

from megatron_mhmoe import atomic
from megatron_mhmoe.evaluation import progress
from megatron_mhmoe.evaluation.tasks import LOCAL, local_task_yamls


def hf_folder_for(model: str, scratch: str) -> str:
    """A transformers folder for --model (exported with export_hf when it is not one already)."""
    if os.path.isfile(os.path.join(model, "mhmoe_export.json")):
        return model
    from megatron_mhmoe.export.huggingface import export_hf
    return export_hf(model, os.path.join(scratch, "hf"), log=lambda m: None)


def summarize(results: dict) -> dict:
    """task -> {metric: value} from the harness's results (its ',none' filter suffix dropped)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not k.startswith("alias") and "_stderr" not in k}
        out[task].update({k.split(",")[0]: v for k, v in metrics.items() if "_stderr" in k and isinstance(v, float)})
    return out


def evaluate(model: str, tasks: list[str], batch_size: int = 8, limit: int | None = None, device: str = "cpu",
             log=print, plain_progress: bool | None = None) -> dict:
    """plain_progress: progress as lines instead of bars (default: when stdout or stderr is not a terminal)."""
    if plain_progress is None:
        plain_progress = not (sys.stdout.isatty() and sys.stderr.isatty())
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager
    names = [n for t in tasks for n in (LOCAL if t == "local" else (t,))]
    with tempfile.TemporaryDirectory() as scratch:
        folder = hf_folder_for(model, scratch)
        task_dir = os.path.join(scratch, "tasks")
        os.makedirs(task_dir)
        local_task_yamls(task_dir)
        log(f"evaluating {folder} on {', '.join(names)} (lm-eval {lm_eval.__version__})")
        with progress.clean_output(plain_progress, log):
            if plain_progress:
                progress.quiet_library_bars()
            results = lm_eval.simple_evaluate(
                model="hf", model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32,device={device}",
                tasks=names, task_manager=TaskManager(include_path=task_dir), batch_size=batch_size, limit=limit,
                log_samples=False)
    summary = summarize(results)
    return {"model": os.path.abspath(model), "tasks": names, "limit": limit, "results": summary,
            "lm_eval_version": lm_eval.__version__}


def log_to_wandb(report: dict, group: str, name: str) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    import wandb
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "megatron_mhmoe"), group=group, name=name,
                     job_type="eval", config={"model": report["model"], "tasks": report["tasks"]},
                     dir=os.environ.get("WANDB_DIR") or None)
    run.summary.update({f"eval/{task}/{k}": v for task, m in report["results"].items() for k, v in m.items()})
    run.finish()


def evaluate_to_file(model: str, task_names: list[str], out: str, batch_size: int = 8, limit: int | None = None,
                     device: str = "cpu", wandb_group: str | None = "eval", wandb_name: str | None = None) -> dict:
    """evaluate(), the report written to `out` (JSON), one line per task printed, and a wandb run unless
    wandb_group is None (name: wandb_name, default the model folder's name)."""
    report = evaluate(model, task_names, batch_size, limit, device)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic.write_json(out, report)
    for task, metrics in report["results"].items():
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if "stderr" not in k))
    print(f"results: {os.path.abspath(out)}")
    if wandb_group is not None:
        log_to_wandb(report, wandb_group, wandb_name or os.path.basename(os.path.abspath(model)))
    return report
