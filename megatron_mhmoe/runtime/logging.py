"""Rank-0 metrics: console lines, a metrics.jsonl file, and Weights & Biases (offline unless set up).

wandb mode, in order: the config's `wandb.mode`; the WANDB_MODE environment variable; `online` when an
API key is configured (WANDB_API_KEY or a netrc entry for api.wandb.ai); else `offline`, so a machine
without network or account still records every run under `<run_dir>/wandb/` (sync it later with
`wandb sync`). Secrets never reach the logged config: keys that look like credentials are redacted.
"""
from __future__ import annotations

import json
import math
import netrc
import os
import re
import sys
import time
from typing import Any, Optional

# `token(?!iz)`: hf_token / accessToken are secrets; tokenizer_model (a path in the run config) is not.
SECRET_KEY = re.compile(r"(api[_-]?key|token(?!iz)|secret|password|passwd|credential)", re.IGNORECASE)
SECRET_VALUE = re.compile(r"\b[0-9a-f]{40}\b|\b(sk|hf|ghp|wandb)[-_][A-Za-z0-9_-]{16,}\b")


def _literal_secrets() -> list[str]:
    """The configured wandb key as it is and stripped, longest first: a key of any form (a local
    server's key need not be 40-hex) is redacted wherever its exact text appears."""
    key = os.environ.get("WANDB_API_KEY", "")
    return sorted({v for v in (key, key.strip()) if v}, key=len, reverse=True)


def redact_text(text: str) -> str:
    """text with the value of WANDB_API_KEY and credential-looking values replaced by '***'."""
    for secret in _literal_secrets():
        text = text.replace(secret, "***")
    return SECRET_VALUE.sub("***", text)


def redact(obj: Any) -> Any:
    """A copy of a config/mapping with credential-like keys and values replaced by '***' (strings at any
    depth go through redact_text)."""
    if isinstance(obj, dict):
        return {k: ("***" if isinstance(k, str) and SECRET_KEY.search(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
        return bool(auth and auth[2])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(configured: str) -> str:
    if configured:
        return configured
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_has_credentials() else "offline"


WANDB_INIT_ATTEMPTS = 8
"""Should a service still hold the resumed run id ("run ID ... is in use"), wandb.init is retried this many
times, 2 s apart, before the launch goes on without wandb."""


def _init_wandb(wandb, kwargs: dict):
    """wandb.init, retried while the resumed run id is still held; without wandb (metrics.jsonl keeps every
    row, and the next resume sends wandb what it missed) if it stays held."""
    for attempt in range(WANDB_INIT_ATTEMPTS):
        try:
            return wandb.init(**kwargs)
        except Exception as e:  # wandb raises its own error classes; only "in use" is worth waiting for
            if "in use" not in str(e) or kwargs.get("id") is None:
                raise
            if attempt == WANDB_INIT_ATTEMPTS - 1:
                print(f"WARNING: wandb run {kwargs['id']} is still held by an earlier launch ({redact_text(str(e))}); "
                      f"logging to metrics.jsonl only in this launch (the next resume sends wandb the missing rows)",
                      file=sys.stderr, flush=True)
                return None
            time.sleep(2.0)
    return None


def _tensorboard_writer(folder: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError(f"tensorboard.enabled=true needs the tensorboard package ({e}): pip install tensorboard, or "
                         f"set --tensorboard.enabled=false") from None
    os.makedirs(folder, exist_ok=True)
    return SummaryWriter(log_dir=folder)


class MetricsLogger:
    """Writes on rank 0 only; other ranks get a logger whose methods do nothing."""

    def __init__(self, run_dir: str, wandb_cfg, config_dict: dict, enabled: bool, run_name: str,
                 resume_id: Optional[str] = None, tensorboard_cfg=None):
        self.enabled = enabled
        self.run = None
        self.tb = None
        self.run_dir = run_dir
        self.jsonl = None
        self.wandb_dir = None
        self.resume_id, self.mode = resume_id, None
        self.wandb_floor: Optional[int] = None  # steps up to here are in wandb already (catch_up)
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if tensorboard_cfg is not None and tensorboard_cfg.enabled:
            self.tb = _tensorboard_writer(tensorboard_cfg.dir or os.path.join(run_dir, "tensorboard"))
        mode = self.mode = resolve_wandb_mode(wandb_cfg.mode)
        if mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        # wandb publishes its service in WANDB_SERVICE, which child processes inherit: a training launched by
        # a process that used wandb (a sweep driver, a test session) would join that long-lived service, where
        # the stream of a killed launch of the same run id stays registered ("run ID ... is in use"). Each
        # training process runs its own.
        os.environ.pop("WANDB_SERVICE", None)
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is in requirements
            print("wandb is not installed: logging to metrics.jsonl only", file=sys.stderr)
            return
        self.wandb_dir = wandb_cfg.dir or run_dir
        os.makedirs(self.wandb_dir, exist_ok=True)
        # wandb records the command line in the run's metadata: hand it a redacted copy.
        argv, sys.argv = sys.argv, [redact_text(a) for a in sys.argv]
        kwargs = dict(project=redact_text(wandb_cfg.project), group=redact_text(wandb_cfg.group or "") or None,
                      name=redact_text(wandb_cfg.name or run_name),
                      tags=[redact_text(t) for t in wandb_cfg.tags] or None, config=redact(config_dict),
                      dir=self.wandb_dir, mode=mode, id=resume_id, resume="allow" if resume_id else None,
                      reinit=True)
        try:
            self.run = _init_wandb(wandb, kwargs)
        finally:
            sys.argv = argv

    @property
    def run_id(self) -> Optional[str]:
        # A resumed id whose wandb.init gave up stays the run's id: the next resume catches wandb up.
        return self.run.id if self.run is not None else self.resume_id

    @property
    def wandb_path(self) -> Optional[str]:
        return getattr(self.run, "dir", None) if self.run is not None else None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():  # scalars only: lists (per-layer counts) stay in metrics.jsonl
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, global_step=step)
            self.tb.flush()
        if self.run is not None and (self.wandb_floor is None or step > self.wandb_floor):
            self.run.log({k: v for k, v in clean.items() if not (isinstance(v, float) and math.isnan(v))},
                         step=step)

    def catch_up(self, checkpoint_step: int) -> None:
        """On resume: metrics.jsonl rows after the checkpoint dropped, the rows wandb never received sent to it
        (runtime/wandb_replay.py)."""
        from megatron_mhmoe.runtime.wandb_replay import catch_up
        note = catch_up(self, checkpoint_step)
        if note:
            print(note, flush=True)

    def log_image(self, key: str, path: str, step: int) -> None:
        if self.run is not None:
            import wandb
            self.run.log({key: wandb.Image(path)}, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
            self.jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.run is not None:
            self.run.finish()
            self.run = None


CONSOLE_WIDTH = 120
"""Console step and progress lines never exceed this many characters; every value is in metrics.jsonl."""

# (metrics key, console label, format); the first STEP_CORE always print, the rest while the line fits.
STEP_FIELDS = (("loss", "loss", ".4f"), ("lr", "lr", ".2e"), ("grad_norm", "gnorm", ".3f"),
               ("tokens_per_s", "tok/s", ".0f"), ("step_time_s", "s/step", ".3f"), ("loss_scale", "scale", ".0f"),
               ("moe/activation_ratio", "act", ".2f"), ("moe/dropped_fraction", "drop", ".3f"),
               ("mfu", "mfu", ".1%"), ("aux_loss", "aux", ".4f"))
STEP_CORE = 5


def format_eta(seconds: Optional[float]) -> str:
    """h:mm:ss, or '?' before a step has been timed."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_line(step: int, total: int, m: dict, eta_s: Optional[float] = None) -> str:
    """One console line per log interval, at most CONSOLE_WIDTH characters: step, loss, lr, grad norm,
    tokens/s and step time always, then loss scale, activation ratio, dropped fraction, MFU and aux loss while
    they fit, then the ETA. Values that are None or absent are left out."""
    head = [f"step {step:>{len(str(total))}}/{total}"]  # aligned within a run
    tail = [f"eta {format_eta(eta_s)}"] if eta_s is not None else []
    for i, (key, label, fmt) in enumerate(STEP_FIELDS):
        if m.get(key) is None:
            continue
        part = f"{label} {m[key]:{fmt}}"
        if i >= STEP_CORE and len(" | ".join(head + [part] + tail)) > CONSOLE_WIDTH:
            continue
        head.append(part)
    return " | ".join(head + tail)[:CONSOLE_WIDTH]


def run_summary(cfg, ctx, counts: dict, flops_per_token: float, config_file: str) -> list[str]:
    """The few lines printed at start (the whole config is in config_file; --print-config prints it)."""
    m, t, mo = cfg.model, cfg.train, cfg.model.moe
    layout = (f"world {ctx.world_size} = TP {ctx.tp_size} x DP {ctx.dp_size}, MoE EP {ctx.ep_size} x EDP "
              f"{ctx.world_size // ctx.ep_size}, sequence parallel {'on' if ctx.sequence_parallel else 'off'}")
    model = f"{m.num_layers} layers, d={m.hidden_size}, {m.num_attention_heads} attention heads, vocab {m.vocab_size}"
    if mo is not None:
        kind = "MH-MoE" if mo.num_heads > 1 else "SMoE"
        model += (f"; {kind} every {mo.moe_every} layers: {mo.num_experts} experts, top-{mo.top_k}, h={mo.num_heads}, "
                  f"{mo.gate} gate")
    data = ", ".join(str(p) for p in cfg.data.data_path) if cfg.data.data_path else "the built-in corpus"
    lines = [
        f"run {cfg.run_dir}: {t.train_steps} steps; full config: {config_file}",
        f"model: {model}",
        "parameters: " + ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in counts.items())
        + f"; forward {flops_per_token / 1e6:.2f} MFLOP/token",
        f"layout: {layout}; ZeRO-{t.zero_stage}, {t.precision}",
        f"batch: micro {t.micro_batch_size} x accumulation {t.grad_accum_steps} x DP {ctx.dp_size} = global "
        f"{t.global_batch_size} sequences of {t.seq_len} tokens",
        f"data: {data}",
        f"wandb: project {cfg.wandb.project}, group {cfg.wandb.group or '-'}, name "
        f"{cfg.wandb.name or os.path.basename(os.path.abspath(cfg.run_dir))}",
    ]
    return [redact_text(line) for line in lines]


class Progress:
    """Progress of the training loop for a person. On a terminal: a tqdm bar on stderr (with its own ETA).
    Through a pipe (the launchers, a log file): no bar, but a plain `progress:` line with the ETA when
    `interval_s` seconds passed without a console line. ETA = steps left x mean seconds per step of this
    launch; `line()` is how step lines and other messages reach the console without breaking the bar."""

    def __init__(self, total: int, initial: int, interval_s: float, tty: Optional[bool] = None,
                 clock=time.monotonic, out=None):
        self.total, self.initial, self.step = total, initial, initial
        self.interval_s, self.clock = interval_s, clock
        self.out = out or sys.stdout
        self.t0 = self.last_line = clock()
        self.bar = None
        if (self.out.isatty() if tty is None else tty):
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=2.0, file=sys.stderr)

    def eta_s(self) -> Optional[float]:
        done = self.step - self.initial
        if done <= 0:
            return None
        return (self.total - self.step) * (self.clock() - self.t0) / done

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)
        self.last_line = self.clock()

    def update(self, step: int) -> Optional[str]:
        """Step `step` is done; returns the progress line it printed, if any."""
        self.step = step
        if self.bar is not None:
            self.bar.update(1)
            return None
        if self.interval_s <= 0 or self.clock() - self.last_line < self.interval_s:
            return None
        done = step - self.initial
        text = (f"progress: step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%), "
                f"{(self.clock() - self.t0) / max(done, 1):.3g} s/step, eta {format_eta(self.eta_s())}")
        self.line(text)
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
