"""Everything a training run is configured by: model, parallel layout, optimisation, data, logging.

A run config is a YAML/JSON file plus `--section.key=value` overrides on the command line; unknown
keys are errors that name the key and the known ones. `validate` checks the batch arithmetic once
(micro batch x accumulation x DP = global batch) and prints it in the message when it fails.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_mhmoe.config import ModelConfig, MoEConfig, check_field_types, model_config_from_dict


@dataclass
class ParallelConfig:
    """How the world is split. World size comes from the launcher."""

    tp: int = 1
    """Tensor-parallel size (attention heads, dense FFN, vocab)."""
    ep: int = 1
    """Expert-parallel size (experts split over EP consecutive ranks; may exceed DP)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism inside TP groups."""
    timeout_s: float = 600.0
    """Collective timeout: a dead or stuck peer becomes an error on every surviving rank after this."""


@dataclass
class TrainConfig:
    """Optimisation, precision, schedule, checkpoints."""

    micro_batch_size: int = 4
    """Sequences per rank per forward/backward."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all DP ranks; 0 = micro_batch_size x grad_accum x DP."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (derived from global_batch_size when that is set)."""
    seq_len: int = 64
    """Tokens per sample (the model sees seq_len, predicts the next token of each)."""
    train_steps: int = 200
    """Optimizer steps."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    warmup_steps: int = 20
    """Linear warmup from 0 to lr."""
    lr_decay_style: str = "cosine"
    """'cosine', 'linear' or 'constant' after warmup."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases, norms, temperatures, embeddings of experts)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.98
    """Adam beta2 (the paper uses 0.98)."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm (every expert counted once) to this; 0 = off."""
    precision: str = "fp32"
    """'fp32', 'bf16' or 'fp16' (fp16 uses dynamic loss scaling)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0/1/2 (3 for dense models only)."""
    offload_optimizer: bool = False
    """ZeRO optimizer state offload to CPU (ZeRO 1/2)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward."""
    compile: bool = False
    """Wrap each transformer block in torch.compile (in place: parameter names and checkpoints unchanged),
    static shapes (dynamic=False). With model.moe.a2a_device_counts=true and a capacity the MoE layer has no
    graph break (what CUDA graphs need too); the dropless path breaks the graph where it reads counts back.
    docs/compile.md has the measured speeds."""
    compile_backend: str = "inductor"
    """The torch.compile backend of train.compile: 'inductor' (code generation; needs a C++ compiler on
    CPU), 'aot_eager' (traces forward and backward graphs and runs them without code generation: checks
    that a model compiles, in seconds), or any other name torch._dynamo.list_backends(exclude_tags=()) gives."""
    seed: int = 1234
    """Seed of weights, data order and dropout."""
    save_dir: str = "runs/default/checkpoints"
    """Where checkpoints go (a folder per step plus a `latest` pointer)."""
    save_interval: int = 100
    """Save every N steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """Keep the newest K usable checkpoints (those resume would accept; an unusable one is moved aside to
    `save_dir/unusable/`, never counted, never deleted)."""
    lock_stale_s: float = 600.0
    """A run-folder lock held by another host and not refreshed (every 30 s by a live run) for this many
    seconds is reported as probably stale, with the command that clears it (runtime/run_lock.py)."""
    resume_schedule: str = "recompute"
    """The learning-rate schedule when a checkpoint is resumed with another train_steps: 'recompute' (warmup
    and decay follow the new train_steps, so the lr at the resume step changes) or 'keep' (the saved
    schedule's train_steps; past its end the lr stays flat at its final value). The old and new lr are
    printed at resume either way."""
    resume: bool = True
    """Resume from save_dir/latest when it exists."""
    allow_changed_resume: bool = False
    """Resume even when a setting that defines the data or the routing (global batch, seq_len, seed, data
    paths/weights, split, num_experts, top_k, num_heads, gate, capacity factor) differs from the checkpoint's
    manifest; refused otherwise. The data position carries over in samples (consumed_samples), not remapped:
    the train set is drawn for train_steps x global_batch_size samples, so a changed global batch (like a
    changed seq_len, seed, data or split, or train_steps) reshuffles it and the resumed run does not see the
    samples the saved one would have seen next."""
    allow_debug_routing: bool = False
    """Train although model.moe.debug_routing replaces the router's choice (throughput/memory worst-case
    runs, whose model learns nothing useful about routing); refused otherwise."""
    eval_interval: int = 100
    """Validation perplexity every N steps (and at the end); 0 = only at the end."""
    eval_iters: int = 10
    """Micro-batches per validation."""
    log_interval: int = 10
    """Console/wandb line every N steps."""
    progress_interval_s: float = 60.0
    """When stdout is not a terminal (the launchers' pipes, a log file): a `progress:` line with the ETA after
    this many seconds without a console line; 0 = none. On a terminal a progress bar shows it instead."""
    exit_interval: int = 0
    """Stop (after saving a checkpoint) once this launch has run this many steps; 0 = run to train_steps.
    For jobs split over scheduler allocations; the schedule still follows train_steps."""
    max_nonfinite_steps: int = 5
    """Stop (keeping the last good checkpoint) after this many non-finite steps in a row."""


@dataclass
class DataConfig:
    """Where tokens come from."""

    data_path: list = field(default_factory=list)
    """Megatron prefixes, or a blend [w1, prefix1, w2, prefix2, ...]. Empty = the built-in corpus. A string is
    read as Megatron's --data-path: one prefix, or "w1 prefix1 w2 prefix2 ..." (split on whitespace)."""
    split: str = "969,30,1"
    """train,valid,test weights over documents."""
    tokenizer_model: str = ""
    """SentencePiece model or tokenizer.json the data was tokenized with: its type and sha256 are checked
    against every dataset's .meta.json at start (and its vocabulary against the model)."""
    allow_tokenizer_mismatch: bool = False
    """Train although data.tokenizer_model is not the tokenizer a dataset's .meta.json records (refused
    otherwise: the model would learn one tokenizer's ids and be exported with another)."""
    cache_dir: str = ""
    """Index caches; empty = next to the data."""
    eval_seed: Optional[int] = 1234
    """Shuffling seed of the validation split, fixed so that runs with different train.seed are evaluated on
    the same samples (seed sweeps compare models, not validation draws); null = train.seed, as Megatron."""


@dataclass
class WandbConfig:
    """Weights & Biases logging (rank 0 only)."""

    project: str = "megatron_mhmoe"
    """W&B project."""
    group: str = ""
    """Run group (a sweep puts all its runs in one)."""
    name: str = ""
    """Run name; empty = derived from the config."""
    tags: list = field(default_factory=list)
    """Run tags."""
    mode: str = ""
    """'online', 'offline' or 'disabled'; empty = WANDB_MODE, else online with an API key, else offline."""
    dir: str = ""
    """Where wandb writes; empty = the run directory."""


@dataclass
class TensorBoardConfig:
    """TensorBoard event files beside wandb (rank 0 only), with the same metric names as metrics.jsonl."""

    enabled: bool = False
    """Write event files (needs the tensorboard package: pip install tensorboard)."""
    dir: str = ""
    """Where the event files go; empty = <run_dir>/tensorboard."""


@dataclass
class RunConfig:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    run_dir: str = "runs/default"
    """Folder for this run's logs, metrics.jsonl, wandb files and (by default) checkpoints."""

    # ------------------------------------------------------------------ batch arithmetic
    def resolve_batch(self, world_size: int) -> None:
        """Fill global batch / accumulation from each other; raise with the arithmetic if they disagree."""
        t, p = self.train, self.parallel
        if world_size % p.tp:
            raise ValueError(f"tensor-parallel size {p.tp} does not divide world size {world_size}")
        dp = world_size // p.tp
        per_step = t.micro_batch_size * dp
        if t.micro_batch_size < 1 or t.grad_accum_steps < 1:
            raise ValueError(f"micro_batch_size={t.micro_batch_size} and grad_accum_steps={t.grad_accum_steps} "
                             f"must be >= 1")
        if t.global_batch_size <= 0:
            t.global_batch_size = per_step * t.grad_accum_steps
            return
        if t.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {t.global_batch_size} is not a multiple of micro_batch_size x DP = "
                f"{t.micro_batch_size} x {dp} = {per_step} ({t.global_batch_size} % {per_step} = "
                f"{t.global_batch_size % per_step}); global = micro x accumulation x DP")
        t.grad_accum_steps = t.global_batch_size // per_step

    def validate(self, world_size: int) -> None:
        m, t, p = self.model, self.train, self.parallel
        m.validate_for_parallel(p.tp, p.ep)
        from megatron_mhmoe.parallel.layout import validate_sizes
        validate_sizes(world_size, p.tp, p.ep)
        self.resolve_batch(world_size)
        if t.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision={t.precision!r} is not one of ['fp32', 'bf16', 'fp16']")
        if t.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage={t.zero_stage} is not one of [0, 1, 2, 3]")
        if t.zero_stage == 3 and m.moe is not None:
            raise ValueError("ZeRO-3 partitions every parameter over DP, which breaks expert parallelism "
                             "(DeepSpeed refuses ZeRO-3 with MoE too): use train.zero_stage=1 or 2 for MoE "
                             "models, or a dense model (model.moe=null) with ZeRO-3")
        if t.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(f"train.lr_decay_style={t.lr_decay_style!r} is not one of cosine/linear/constant")
        if t.seq_len > m.max_seq_len:
            raise ValueError(f"train.seq_len {t.seq_len} exceeds model.max_seq_len {m.max_seq_len}")
        if t.resume_schedule not in ("recompute", "keep"):
            raise ValueError(f"train.resume_schedule={t.resume_schedule!r} is not one of recompute/keep")
        if t.train_steps < 1:
            raise ValueError(f"train.train_steps={t.train_steps} must be >= 1")
        if m.moe is not None and p.tp > 1 and not p.sequence_parallel \
                and (t.seq_len * t.micro_batch_size) % p.tp:
            raise ValueError(
                f"the MoE layer splits seq_len x micro_batch = {t.seq_len} x {t.micro_batch_size} = "
                f"{t.seq_len * t.micro_batch_size} tokens over TP={p.tp}: make it divisible")
        if p.sequence_parallel and t.seq_len % p.tp:
            raise ValueError(f"sequence parallelism splits seq_len {t.seq_len} over TP={p.tp}: "
                             f"{t.seq_len} % {p.tp} = {t.seq_len % p.tp}")
        # Ranges: a value outside them would crash mid-run (log_interval=0) or silently misbehave (lr<0).
        import math
        for where, value, low, strict in (
                ("train.lr", t.lr, 0.0, True), ("train.min_lr", t.min_lr, 0.0, False),
                ("train.warmup_steps", t.warmup_steps, 0, False), ("train.weight_decay", t.weight_decay, 0.0, False),
                ("train.adam_eps", t.adam_eps, 0.0, True), ("train.clip_grad", t.clip_grad, 0.0, False),
                ("train.log_interval", t.log_interval, 1, False), ("train.save_interval", t.save_interval, 0, False),
                ("train.eval_interval", t.eval_interval, 0, False), ("train.eval_iters", t.eval_iters, 0, False),
                ("train.exit_interval", t.exit_interval, 0, False), ("train.keep_last", t.keep_last, 0, False),
                ("train.max_nonfinite_steps", t.max_nonfinite_steps, 1, False),
                ("parallel.timeout_s", p.timeout_s, 0.0, True), ("train.lock_stale_s", t.lock_stale_s, 60.0, False),
                ("train.progress_interval_s", t.progress_interval_s, 0.0, False)):
            if not math.isfinite(float(value)) or value < low or (strict and value == low):
                raise ValueError(f"{where}={value} must be {'>' if strict else '>='} {low}")
        for where, value in (("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{where}={value} must be in [0, 1)")
        if m.moe is not None and m.moe.debug_routing and not t.allow_debug_routing:
            raise ValueError(
                f"model.moe.debug_routing={m.moe.debug_routing!r} replaces the router's choice of experts "
                f"(a throughput/memory worst case, not a model worth training): pass "
                f"--train.allow_debug_routing=true to train with it anyway, or --model.moe.debug_routing= to "
                f"route normally")
        if t.compile:
            from megatron_mhmoe.model.compile import check_backend
            check_backend(t.compile_backend)
        if m.moe is not None and not (m.moe.capacity_factor >= 0.0 and math.isfinite(m.moe.capacity_factor)):
            raise ValueError(f"model.moe.capacity_factor={m.moe.capacity_factor} must be >= 0 (0 = dropless)")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown top-level key(s) {unknown}; known: {sorted(known)}")
        for name, value in d.items():
            if name != "run_dir" and value is not None and not isinstance(value, dict):
                raise ValueError(f"section {name!r} must be a mapping of keys, got {type(value).__name__} {value!r}")
        cfg = cls()
        if "model" in d:
            moe = (d["model"] or {}).get("moe")
            if moe is not None and not isinstance(moe, dict):
                raise ValueError(f"model.moe must be a mapping of MoE keys (or null for a dense model), got "
                                 f"{type(moe).__name__} {moe!r}")
            cfg.model = model_config_from_dict(d["model"] or {})
        for name, typ in (("parallel", ParallelConfig), ("train", TrainConfig), ("data", DataConfig),
                          ("wandb", WandbConfig), ("tensorboard", TensorBoardConfig)):
            if name in d:
                setattr(cfg, name, _build(typ, d[name] or {}, name))
        if "run_dir" in d:
            cfg.run_dir = d["run_dir"]
        return cfg


def _build(typ, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(typ)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(names)}")
    if typ is DataConfig and isinstance(d.get("data_path"), str):
        d = dict(d, data_path=d["data_path"].split())  # --data.data_path=/x/prefix: Megatron's string form
    check_field_types(typ, d, where)
    return typ(**d)


def _yaml_load(text: str, what: str) -> Any:
    """yaml.safe_load (never constructs Python objects) that also reads `3e-4` / `1e3` as floats.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so `lr: 3e-4` would
    silently become the string '3e-4'. Malformed YAML is a ValueError naming `what`.
    """
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+.0123456789"))
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ValueError(f"{what} is not valid YAML: {e}") from None


def load_config_file(path: str) -> dict:
    if not os.path.exists(path):
        raise ValueError(f"config file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        data = _yaml_load(text, f"config file {path!r}")  # safe: a config file must not construct Python objects
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` (value parsed as YAML: numbers, bools, lists, null) to a config dict."""
    for item in overrides:
        key, sep, raw = item.lstrip("-").partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like --section.key=value")
        value = _yaml_load(raw, f"override {item!r}") if raw != "" else ""
        node = d
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
            node = node[part]
        node[parts[-1]] = value
    return d


def default_moe_model() -> ModelConfig:
    """The built-in default: a small MH-MoE GPT that trains on 2 CPU processes in minutes."""
    return ModelConfig(vocab_size=2048, hidden_size=128, num_layers=4, num_attention_heads=4, ffn_hidden_size=512,
                       max_seq_len=128, moe=MoEConfig(num_experts=8, top_k=2, num_heads=4, expert_hidden_size=128,
                                                      capacity_factor=0.0, moe_every=2))


def program_defaults() -> RunConfig:
    """What `python -m megatron_mhmoe.train` starts from before the config file and overrides."""
    cfg = RunConfig(model=default_moe_model())
    cfg.parallel.ep = 2
    return cfg


# Batch fields a DeepSpeed file may repeat only with the run config's values.
DS_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# DeepSpeed sections the program refuses, with the run-config fields that replace them.
DS_REPLACED_SECTIONS = {"optimizer": ("lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps"),
                        "scheduler": ("lr", "min_lr", "warmup_steps", "lr_decay_style", "train_steps")}


def check_ds_config_agrees(run_cfg: RunConfig, ds_cfg: Any, path: str) -> list[str]:
    """The rules a --deepspeed_config file must follow, for the program and for the pre-launch check alike.

    The run config is the source of truth for what both can set: ZeRO stage, precision, optimizer offload,
    the batch fields and gradient clipping. A DeepSpeed file that says otherwise, or that holds an
    optimizer/scheduler section (the program builds its own AdamW and LR schedule), is a ValueError naming
    every problem with its fix. Call it after run_cfg.validate(world), which resolves the batch fields.
    Returns the notes for the caller to print (none today; kept so callers need not change when one is added).
    """
    if not isinstance(ds_cfg, dict):
        raise ValueError(f"DeepSpeed config {path} must hold a JSON object, got {type(ds_cfg).__name__}")
    for key in ("zero_optimization", "bf16", "fp16"):
        if ds_cfg.get(key) is not None and not isinstance(ds_cfg[key], dict):
            raise ValueError(f"DeepSpeed config {path}: '{key}' must be a JSON object, got "
                             f"{type(ds_cfg[key]).__name__} {ds_cfg[key]!r}")
    t = run_cfg.train
    zero = ds_cfg.get("zero_optimization") or {}
    problems = []
    stage = zero.get("stage")
    if stage is not None:
        # bool is an int in Python, but `"stage": true` is no stage; "2" (a string) is refused as well.
        if isinstance(stage, bool) or not isinstance(stage, (int, float)):
            problems.append(f"zero_optimization.stage={stage!r} is not a ZeRO stage number (0-3); the program "
                            f"takes the stage from train.zero_stage={t.zero_stage}")
        elif stage != t.zero_stage:
            problems.append(f"zero_optimization.stage={stage} but train.zero_stage={t.zero_stage} "
                            f"(add --train.zero_stage={stage:g})")
    enabled = [prec for prec in ("bf16", "fp16") if bool((ds_cfg.get(prec) or {}).get("enabled", False))]
    if len(enabled) == 2:
        problems.append(f"bf16.enabled and fp16.enabled are both true; train.precision={t.precision}")
    elif enabled and enabled[0] != t.precision:
        problems.append(f"{enabled[0]}.enabled=true but train.precision={t.precision} "
                        f"(add --train.precision={enabled[0]})")
    elif not enabled and ("bf16" in ds_cfg or "fp16" in ds_cfg) and t.precision != "fp32":
        # A file that names a half-precision section only to disable it asks for fp32.
        sections = " and ".join(f"{prec}.enabled=false" for prec in ("bf16", "fp16") if prec in ds_cfg)
        problems.append(f"{sections} (fp32) but train.precision={t.precision} (add --train.precision=fp32)")
    if "offload_optimizer" in zero and not t.offload_optimizer:
        problems.append("zero_optimization.offload_optimizer is set but train.offload_optimizer=false "
                        "(add --train.offload_optimizer=true)")
    # A key equal to the run config's value is harmless; a different one would be silently overwritten.
    for key, field_name, have in (("train_batch_size", "global_batch_size", t.global_batch_size),
                                  ("train_micro_batch_size_per_gpu", "micro_batch_size", t.micro_batch_size),
                                  ("gradient_accumulation_steps", "grad_accum_steps", t.grad_accum_steps),
                                  ("gradient_clipping", "clip_grad", t.clip_grad)):
        if key not in ds_cfg:
            continue
        value = ds_cfg[key]
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or value != have:
            shown = f"{value:g}" if numeric else repr(value)
            problems.append(f"{key}={shown} but train.{field_name}={have:g} (the run config is the source of "
                            f"truth: remove {key} from the file, or pass --train.{field_name}={shown} if that is "
                            f"the value you mean)")
    for key, fields in DS_REPLACED_SECTIONS.items():
        if key in ds_cfg:
            article = "an" if key == "optimizer" else "a"
            problems.append(f"{article} '{key}' section, which the program does not use (it builds its own "
                            f"{'torch AdamW' if key == 'optimizer' else 'LR schedule'}): remove it and set "
                            f"{', '.join('train.' + f for f in fields)} in the run config instead")
    if problems:
        raise ValueError(f"DeepSpeed config {path} disagrees with the run config, from which the program takes "
                         f"ZeRO stage, precision, offload, batch sizes, gradient clipping, optimizer and LR "
                         f"schedule: " + "; ".join(problems))
    return []


def merged_dict(base: RunConfig, file_dict: Optional[dict], overrides: list[str]) -> dict:
    d = base.to_dict()
    if file_dict:
        _deep_update(d, file_dict)
    return apply_overrides(d, overrides)


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
