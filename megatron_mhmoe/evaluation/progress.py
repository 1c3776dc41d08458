"""lm-eval-harness's output made readable in logs: its per-request truncation warnings counted into one line,
its tqdm bars turned into plain lines at each quarter when the output is not a terminal, and the git hash it
records looked up without git's "fatal: not a git repository" noise (clean_output patches and restores)."""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess


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


def quiet_library_bars() -> None:
    """datasets' and transformers' own bars (loading, splits) say nothing a log needs."""
    with contextlib.suppress(Exception):
        import datasets
        datasets.disable_progress_bars()
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
