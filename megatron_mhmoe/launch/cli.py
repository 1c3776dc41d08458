"""The training program's command line, defined once.

`megatron_mhmoe.train` parses with it, and `megatron_mhmoe/launch/launch_check.py` (the pre-launch check of every launch
script) splits the training arguments with the same `parse_args` and resolves them with the same
`resolve_config`, so the two cannot drift apart. Importing this module (and calling `resolve_config`) does
not import torch: the launch check runs it before anything is started.
"""
from __future__ import annotations

import argparse
from typing import Optional

OVERRIDE_HINT = "overrides look like --section.key=value"


class _OneLineParser(argparse.ArgumentParser):
    """Raises ValueError with one line instead of printing usage and exiting (for the launch check)."""

    def error(self, message):
        raise ValueError(message)


def build_parser(raise_errors: bool = False) -> argparse.ArgumentParser:
    """The options of `python -m megatron_mhmoe.train`.

    raise_errors: ValueError instead of usage + exit 2, and no -h/--help (which would print and exit), so a
    caller that checks arguments is never ended by them.
    """
    cls = _OneLineParser if raise_errors else argparse.ArgumentParser
    p = cls(prog="python -m megatron_mhmoe.train", add_help=not raise_errors,
            description="Train a GPT with MH-MoE layers. Any config field can be overridden as --section.key=value "
                        "(e.g. --train.lr=3e-4 --parallel.ep=2 --model.moe.num_heads=4).")
    p.add_argument("--config", default=None, help="YAML or JSON run config")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                   help="DeepSpeed JSON (ZeRO, precision extras); batch fields are filled from the run config")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("--deepspeed", action="store_true", help="accepted for launcher compatibility")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def split_overrides(rest: list[str]) -> Optional[str]:
    """None if every leftover argument is an override, else the first one that is not."""
    for item in rest:
        if not (item.startswith("--") and "=" in item):
            return item
    return None


def parse_args(argv: Optional[list[str]], raise_errors: bool = False) -> tuple[argparse.Namespace, list[str]]:
    """(options, overrides); exits with usage on a bad argument, like any argparse program, or with
    raise_errors raises ValueError (see build_parser)."""
    p = build_parser(raise_errors)
    args, rest = p.parse_known_args(argv)
    bad = split_overrides(rest)
    if bad is not None:
        p.error(f"unrecognised argument {bad!r}: {OVERRIDE_HINT}")
    return args, rest


def resolve_config(config_path: Optional[str], overrides: list[str]):
    """The run config: program defaults, then the --config file, then the overrides."""
    from megatron_mhmoe.runtime.run_config import RunConfig, load_config_file, merged_dict, program_defaults
    file_dict = load_config_file(config_path) if config_path else None
    return RunConfig.from_dict(merged_dict(program_defaults(), file_dict, overrides))
