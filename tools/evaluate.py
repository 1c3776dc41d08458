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
Output: the harness's per-request "Truncating N tokens from the left" warnings become one summary line; its
progress bars become plain lines (at 25, 50, 75 and 100%) when stdout or stderr is not a terminal; the git hash it records
is this checkout's, looked up without git's "fatal: not a git repository" noise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
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


class TruncationCounter(logging.Filter):
    """Swallows lm-eval's per-request "Truncating N tokens from the left." warnings, counting them."""

    def __init__(self):
        super().__init__()
        self.requests = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "tokens from the left" in record.getMessage():
            self.requests += 1
            return False
        return True

    def summary(self) -> str | None:
        if not self.requests:
            return None
        return (f"lm-eval truncated {self.requests} request(s) from the left to the model's max_seq_len (context "
                f"+ continuation longer than the positions the model was trained on)")


class LineProgress:
    """tqdm's interface as plain lines, at each quarter of the total, for logs that are not terminals."""

    def __init__(self, iterable=None, total=None, desc=None, disable=False, **kwargs):
        self.iterable, self.desc, self.disable = iterable, desc or "progress", disable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self._shown = 0, -1

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self):
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable or not self.total:
            return
        quarter = min(self.n * 4 // self.total, 4)
        if quarter > self._shown and quarter > 0:
            self._shown = quarter
            print(f"{self.desc}: {self.n}/{self.total} ({100 * self.n // self.total}%)", flush=True)

    def close(self) -> None:
        if not self.disable and self.total and self._shown < 4 and self.n >= self.total:
            self._shown = 4
            print(f"{self.desc}: {self.n}/{self.total} (100%)", flush=True)

    def set_description(self, desc=None, refresh=True):
        self.desc = desc or self.desc

    def set_postfix(self, *args, **kwargs):
        pass

    def refresh(self):
        pass


def checkout_git_hash() -> str | None:
    """This checkout's commit (what lm-eval records as git_hash), None outside a git checkout; git's errors
    are not printed."""
    try:
        out = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "describe", "--always"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@contextlib.contextmanager
def clean_output(plain_progress: bool, log=print):
    """The harness run with the output described in the module docstring (restored afterwards)."""
    import tqdm as tqdm_module

    import lm_eval.evaluator
    patches = [(lm_eval.evaluator, "get_git_commit_hash", lambda: checkout_git_hash())]
    if plain_progress:
        import importlib
        patches.append((tqdm_module, "tqdm", LineProgress))  # `from tqdm import tqdm` inside functions
        for name in ("lm_eval.models.huggingface", "lm_eval.api.model", "lm_eval.api.task"):
            with contextlib.suppress(ImportError):
                mod = importlib.import_module(name)
                if hasattr(mod, "tqdm"):
                    patches.append((mod, "tqdm", LineProgress))
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, value in patches:
        setattr(obj, attr, value)
    counter = TruncationCounter()
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    hf_logger.addFilter(counter)
    try:
        yield counter
    finally:
        hf_logger.removeFilter(counter)
        for obj, attr, value in saved:
            setattr(obj, attr, value)
        if counter.summary():
            log(counter.summary())


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
        with clean_output(plain_progress, log):
            if plain_progress:
                _quiet_library_bars()
            results = lm_eval.simple_evaluate(
                model="hf", model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32,device={device}",
                tasks=names, task_manager=TaskManager(include_path=task_dir), batch_size=batch_size, limit=limit,
                log_samples=False)
    summary = summarize(results)
    return {"model": os.path.abspath(model), "tasks": names, "limit": limit, "results": summary,
            "lm_eval_version": lm_eval.__version__}


def _quiet_library_bars() -> None:
    """datasets' and transformers' own bars (loading, splits) say nothing a log needs."""
    with contextlib.suppress(Exception):
        import datasets
        datasets.disable_progress_bars()
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


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
