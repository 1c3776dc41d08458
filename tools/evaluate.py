#!/usr/bin/env python
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
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_tasks")
LOCAL = ("mhmoe_next_line", "mhmoe_heldout_ppl")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint, export_checkpoint folder or export_hf folder")
    p.add_argument("--tasks", default="local", help="comma-separated lm-eval task names; 'local' = the shipped ones")
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task (smoke runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-wandb", action="store_true", help="write the JSON only")
    p.add_argument("--wandb-group", default="eval")
    p.add_argument("--wandb-name", default=None, help="default: the model folder's name")
    return p


def local_task_yamls(folder: str) -> None:
    """The shipped tasks as lm-eval YAML files in `folder`, pointing at the committed data files."""
    next_line = {
        "task": "mhmoe_next_line", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.join(TASKS_DIR, "next_line.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}
    heldout = {
        "task": "mhmoe_heldout_ppl", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.join(TASKS_DIR, "heldout.jsonl")}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in
                        (("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                         ("bits_per_byte", "bits_per_byte"))],
        "metadata": {"version": 1.0}}
    for task in (next_line, heldout):
        with open(os.path.join(folder, f"{task['task']}.yaml"), "w") as f:
            json.dump(task, f, indent=1)  # JSON is YAML


def hf_folder_for(model: str, scratch: str) -> str:
    """A transformers folder for --model (exported with tools/export_hf.py when it is not one already)."""
    if os.path.isfile(os.path.join(model, "mhmoe_export.json")):
        return model
    import importlib.util
    spec = importlib.util.spec_from_file_location("export_hf", os.path.join(os.path.dirname(__file__),
                                                                           "export_hf.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.export_hf(model, os.path.join(scratch, "hf"), log=lambda m: None)


def summarize(results: dict) -> dict:
    """task -> {metric: value} from the harness's results (its ',none' filter suffix dropped)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not k.startswith("alias") and "_stderr" not in k}
        out[task].update({k.split(",")[0]: v for k, v in metrics.items() if "_stderr" in k and isinstance(v, float)})
    return out


def evaluate(model: str, tasks: list[str], batch_size: int = 8, limit: int | None = None, device: str = "cpu",
             log=print) -> dict:
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("error: tools/evaluate.py needs the lm-eval package: pip install lm-eval", file=sys.stderr)
        return 2
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")  # the harness's bars are noise in a log: plain lines instead
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    report = evaluate(args.model, tasks, args.batch_size, args.limit, args.device)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, args.out)
    for task, metrics in report["results"].items():
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if "stderr" not in k))
    print(f"results: {os.path.abspath(args.out)}")
    if not args.no_wandb:
        log_to_wandb(report, args.wandb_group, args.wandb_name or os.path.basename(os.path.abspath(args.model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
