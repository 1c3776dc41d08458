"""Check a launch before anything starts: hosts, world size, TP/EP, ports, addresses, run config.

    python -m megatron_mhmoe.launch.launch_check [--hostfile F] [--nodes N] [--gpus-per-node G]
        [--node-rank R] [--tp T] [--ep E] [--master-addr A] [--master-port P] [--config FILE]
        [--include SPEC | --exclude SPEC] [--launcher NAME] [--no-ssh] [--module NAME]
        [--rdzv-backend static|c10d] [--rdzv-id ID] [--ssh-port P] [--max-restarts N]
        [-- TRAINING ARGS ...]

Every launch script in launch/ runs this first and starts its launcher only if it exits 0.

World size: from the hostfile (after --include/--exclude, or --nodes/--gpus-per-node as DeepSpeed's
--num_nodes/--num_gpus apply them), else nodes x gpus-per-node. TP and EP: the training arguments after
`--` are resolved exactly as megatron_mhmoe.train resolves them (built-in defaults < --config file <
--section.key=value overrides), so a bad run config (TP/EP not dividing the world, batch arithmetic,
unknown keys, ZeRO-3 with MoE ...) fails here, before any process is started; --tp/--ep, when given,
must agree with it. The training arguments are parsed and resolved by the program's own functions
(megatron_mhmoe/launch/cli.py), and a --deepspeed_config among them is held to the program's own rules
(run_config.check_ds_config_agrees: a JSON object whose ZeRO stage, precision, optimizer offload, batch
fields and gradient clipping agree with the run config, without optimizer/scheduler sections), so nothing
here can drift from what the program accepts. None of it imports torch.

With the pdsh backend (DeepSpeed's default for multi-node), DeepSpeed joins host names, the master address,
the module name, the training arguments and some environment variables into one shell command line that
runs on every node; for that launch those must also be free of shell-active characters.

On success: a short plan on stdout, exit 0. On failure: one line `launch_check: error: ...` on stderr,
exit 2. Warnings (`launch_check: warning: ...`) go to stderr and do not fail the check.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import OrderedDict
from typing import Optional

from megatron_mhmoe.launch.hostfile import (apply_filters, apply_num_nodes_and_gpus, parse_hostfile,
                                             validate_address, validate_port, validate_positive_int)

PROG = "launch_check"
DEEPSPEED_LAUNCHERS = ("pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi")
OTHER_LAUNCHERS = ("local", "torchrun")
MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
RDZV_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# What DeepSpeed's pdsh backend may put unquoted into the remote command line.
_SHELL_PLAIN_RE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]*$")
# DeepSpeed wraps an argument containing a space (and an exported value containing any other character)
# in double quotes; inside double quotes these still act.
_DQUOTE_ACTIVE = set('$`"\\!\n\r\x00')
# Environment variables DeepSpeed's multi-node backends export to the remote command (runner.EXPORT_ENVS
# plus the CUDA accelerator's export_envs()).
_DS_EXPORT_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")


class CheckError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise CheckError(f"{message} (see --help)")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def warn(message: str) -> None:
    print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr)


# --------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"python -m megatron_mhmoe.runtime.{PROG}",
                description="Validate a distributed launch of megatron_mhmoe.train before starting it.")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile ('host slots=N' lines)")
    p.add_argument("--nodes", default=None, help="number of nodes (first N hosts of the hostfile)")
    p.add_argument("--gpus-per-node", default=None, help="ranks per node (slots 0..G-1 of each host)")
    p.add_argument("--node-rank", default=None, help="this node's rank (per-node launches: --no-ssh, torchrun)")
    p.add_argument("--tp", default=None, help="expected tensor-parallel size (must agree with the run config)")
    p.add_argument("--ep", default=None, help="expected expert-parallel size (must agree with the run config)")
    p.add_argument("--master-addr", default="127.0.0.1", help="rendezvous address (IPv4 or host name)")
    p.add_argument("--master-port", default="29500", help="rendezvous port (1024-65535)")
    p.add_argument("--config", default=None, help="run config (YAML/JSON); also taken from the training args")
    p.add_argument("--include", default="", help="DeepSpeed include filter, e.g. 'worker-0@worker-1:0,2'")
    p.add_argument("--exclude", default="", help="DeepSpeed exclude filter, e.g. 'worker-1:0'")
    p.add_argument("--launcher", default=None, help=f"one of {', '.join(DEEPSPEED_LAUNCHERS + OTHER_LAUNCHERS)}")
    p.add_argument("--no-ssh", action="store_true", help="DeepSpeed --no_ssh: each node started by hand")
    p.add_argument("--module", default="megatron_mhmoe.train", help="the Python module that will be launched")
    p.add_argument("--rdzv-backend", default=None, help="torchrun rendezvous backend: static or c10d")
    p.add_argument("--rdzv-id", default=None, help="torchrun rendezvous id")
    p.add_argument("--ssh-port", default=None, help="ssh port of the hosts (pdsh), 1-65535")
    p.add_argument("--max-restarts", default=None, help="torchrun --max_restarts (non-negative integer)")
    p.epilog = "Everything after `--` is taken as the training program's arguments."
    return p


# ------------------------------------------------------------------------------------------- world
def resolve_world(a) -> tuple["OrderedDict[str, list[int]]", str]:
    """{node: [slots]} that the launcher will start, and where it came from."""
    nodes = validate_positive_int(a.nodes, "--nodes") if a.nodes is not None else None
    gpus = validate_positive_int(a.gpus_per_node, "--gpus-per-node") if a.gpus_per_node is not None else None
    if a.hostfile:
        pool = parse_hostfile(a.hostfile)
        if (a.include or a.exclude) and (nodes is not None or gpus is not None):
            raise CheckError("--include/--exclude cannot be combined with --nodes/--gpus-per-node "
                             "(DeepSpeed refuses that too): use one way of choosing the slots")
        if a.include or a.exclude:
            active = apply_filters(pool, a.include, a.exclude, source=f"hostfile {a.hostfile}")
            return active, f"hostfile {a.hostfile} with --{'include' if a.include else 'exclude'}"
        active = apply_filters(pool)
        active = apply_num_nodes_and_gpus(active, nodes, gpus, capacity=pool)
        return active, f"hostfile {a.hostfile}"
    if a.include or a.exclude:
        raise CheckError("--include/--exclude select slots of a hostfile: give --hostfile too")
    if gpus is None:
        raise CheckError("no --hostfile and no --gpus-per-node: cannot tell how many ranks to start")
    nodes = nodes or 1
    return OrderedDict((f"node{i}", list(range(gpus))) for i in range(nodes)), "--nodes x --gpus-per-node"


# --------------------------------------------------------------------------------------- run config
def split_train_args(train_args: list[str]):
    """(options, overrides) of the training arguments, parsed by the training program's own parser."""
    from megatron_mhmoe.launch import cli
    try:
        return cli.parse_args(train_args, raise_errors=True)
    except ValueError as e:
        raise CheckError(f"training arguments: {e}") from None


def resolve_run_config(config_path: Optional[str], overrides: list[str]):
    """The run config exactly as megatron_mhmoe.train resolves it."""
    from megatron_mhmoe.launch import cli
    return cli.resolve_config(config_path, overrides)


def check_sizes(world: int, tp: int, ep: int) -> None:
    from megatron_mhmoe.parallel.layout import validate_sizes
    try:
        validate_sizes(world, tp, ep)
    except ValueError as e:
        raise CheckError(str(e)) from None


def check_ds_config(path: str, cfg) -> dict:
    """Read the --deepspeed_config file; its rules are the program's (run_config.check_ds_config_agrees)."""
    from megatron_mhmoe.runtime.run_config import check_ds_config_agrees
    if not os.path.isfile(path):
        raise CheckError(f"--deepspeed_config {path} does not exist")
    try:
        with open(path) as f:
            ds = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckError(f"--deepspeed_config {path} is not valid JSON: {e}") from None
    try:
        notes = check_ds_config_agrees(cfg, ds, path)
    except ValueError as e:
        raise CheckError(str(e)) from None
    for note in notes:
        warn(note)
    return ds


# --------------------------------------------------------------------------------------- pdsh safety
def check_shell_safe(a, train_args: list[str]) -> None:
    """What DeepSpeed's pdsh backend pastes into the remote shell command must not be shell-active."""
    for arg in train_args:
        if " " in arg or "\t" in arg:
            bad = sorted(set(arg) & _DQUOTE_ACTIVE) or (["tab"] if "\t" in arg else [])
        else:
            bad = sorted(set(re.sub(r"[A-Za-z0-9_@%+=:,./-]", "", arg)))
        if bad:
            raise CheckError(
                f"training argument {arg!r} holds {' '.join(repr(c) for c in bad)}: DeepSpeed's pdsh launcher "
                f"passes the arguments through a remote shell, so they may hold only letters, digits and "
                f"_@%+=:,./- (a value with spaces may not hold $ ` \" \\ !); put such values in the --config file")
    for what, value in (("working directory", os.getcwd()), ("python executable", sys.executable)):
        if not _SHELL_PLAIN_RE.match(value):
            raise CheckError(f"{what} {value!r} holds characters that DeepSpeed's pdsh launcher would pass "
                             f"unquoted to a remote shell: use a path of letters, digits and _@%+=:,./-")
    for key, value in sorted(os.environ.items()):
        if key.startswith(_DS_EXPORT_PREFIXES) and set(value) & _DQUOTE_ACTIVE:
            raise CheckError(f"environment variable {key} holds shell-active characters "
                             f"({' '.join(sorted(repr(c) for c in set(value) & _DQUOTE_ACTIVE))}) and DeepSpeed's "
                             f"pdsh launcher exports it through a remote shell: unset or fix it")
    env_name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    for d in (os.path.expanduser("~"), "."):
        path = os.path.join(d, env_name)
        if not os.path.isfile(path):
            continue
        with open(path, errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                key, sep, val = line.rstrip("\n").partition("=")
                if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key.strip()) \
                        or set(val.strip()) & _DQUOTE_ACTIVE:
                    raise CheckError(f"{path} line {lineno} ({line.strip()!r}): DeepSpeed exports each KEY=VALUE "
                                     f"line through a remote shell; the key must be a name and the value may not "
                                     f"hold $ ` \" \\ !")


# -------------------------------------------------------------------------------------------- main
def _ranges(ranks: list[int]) -> str:
    return f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def _check_launcher_flags(a) -> tuple[str, int, Optional[str]]:
    """Step 1: the launcher's own flags (address, port, launcher, module, rendezvous, ssh port, restarts)."""
    addr = validate_address(a.master_addr, "--master-addr")
    port = validate_port(a.master_port, "--master-port")
    launcher = (a.launcher or "").lower() or None
    if launcher is not None and launcher not in DEEPSPEED_LAUNCHERS + OTHER_LAUNCHERS:
        raise CheckError(f"--launcher {a.launcher!r} is not one of {', '.join(DEEPSPEED_LAUNCHERS + OTHER_LAUNCHERS)}")
    if not MODULE_RE.match(a.module or ""):
        raise CheckError(f"--module {a.module!r} is not a dotted Python module name")
    if a.rdzv_backend is not None and a.rdzv_backend not in ("static", "c10d"):
        raise CheckError(f"--rdzv-backend {a.rdzv_backend!r} is not one of static, c10d")
    if a.rdzv_id is not None and not RDZV_ID_RE.match(a.rdzv_id):
        raise CheckError(f"--rdzv-id {a.rdzv_id!r}: use 1-64 letters, digits, '_', '.', '-'")

    if a.ssh_port is not None:
        text = str(a.ssh_port).strip()
        if not re.match(r"^[0-9]+$", text) or not 1 <= int(text) <= 65535:
            raise CheckError(f"--ssh-port {a.ssh_port!r} is not a port number (an integer 1-65535)")
    if a.max_restarts is not None and not re.match(r"^[0-9]+$", str(a.max_restarts).strip()):
        raise CheckError(f"--max-restarts {a.max_restarts!r} is not a non-negative integer")
    if launcher == "local" and not a.hostfile and os.path.exists("/job/hostfile"):
        warn("/job/hostfile exists and DeepSpeed's launcher reads it by default: this 'single-node' launch "
             "would use its hosts; remove it or use train_multi_node.sh")
    return addr, port, launcher


def _check_nodes(a, launcher: Optional[str], addr: str) -> tuple[dict, str, Optional[int]]:
    """Step 2: the nodes and ranks (hostfile and filters), this node's rank, what each launcher backend can do."""
    active, source = resolve_world(a)
    n_nodes = len(active)
    node_rank = None
    if a.node_rank is not None:
        text = str(a.node_rank).strip()
        if not re.match(r"^[0-9]+$", text):
            raise CheckError(f"--node-rank {a.node_rank!r} is not a non-negative integer")
        node_rank = int(text)
        if node_rank >= n_nodes:
            raise CheckError(f"--node-rank {node_rank} but there are {n_nodes} node(s): ranks are 0-{n_nodes - 1}")
    if a.no_ssh and node_rank is None:
        raise CheckError("--no-ssh starts one node per command: give --node-rank (0 on the master node)")
    if launcher in ("openmpi", "mvapich"):
        raise CheckError(f"--launcher {launcher}: DeepSpeed's {launcher} backend starts ranks without RANK / "
                         f"WORLD_SIZE / LOCAL_RANK, which megatron_mhmoe.train reads (without them each process "
                         f"would train alone): use pdsh, mpich, impi or train_torchrun.sh")
    if launcher == "slurm":
        raise CheckError("--launcher slurm: DeepSpeed's slurm backend drops --module and sets no RANK: run "
                         "launch/train_torchrun.sh on each node under srun instead")
    if launcher in ("mpich", "impi"):
        if a.include or a.exclude or a.nodes is not None or a.gpus_per_node is not None:
            raise CheckError(f"--launcher {launcher}: DeepSpeed's {launcher} backend uses the whole hostfile and "
                             f"refuses --include/--exclude/--nodes/--gpus-per-node")
        counts = {len(s) for s in active.values()}
        if launcher == "mpich" and len(counts) > 1:
            raise CheckError("--launcher mpich needs the same slots on every host of the hostfile")
    if launcher in DEEPSPEED_LAUNCHERS and not a.hostfile:
        raise CheckError(f"--launcher {launcher} needs --hostfile")
    if n_nodes > 1 and addr in ("127.0.0.1", "localhost") and not a.no_ssh:
        warn(f"{n_nodes} nodes rendezvous at {addr}: other nodes cannot reach a loopback address; set the "
             f"master address to node 0's private interface")
    return active, source, node_rank


def _check_run_config(a, launcher: Optional[str], world: int, n_nodes: int):
    """Step 3: the training arguments: shell-safe where a shell re-parses them, the run config they resolve
    (the training program's own parser and rules) at this world size, and a --deepspeed_config."""
    train_args = list(a.train_args)
    if launcher == "pdsh" and not a.no_ssh and n_nodes > 1:  # DeepSpeed's multi-node (shell) path
        check_shell_safe(a, train_args + [a.module])
    targs, overrides = split_train_args(train_args)
    if a.config and targs.config and os.path.abspath(a.config) != os.path.abspath(targs.config):
        raise CheckError(f"--config {a.config} but the training arguments give --config {targs.config}")
    config_path = targs.config or a.config
    try:
        cfg = resolve_run_config(config_path, overrides)
    except ValueError as e:
        raise CheckError(f"run config: {e}") from None
    tp, ep = cfg.parallel.tp, cfg.parallel.ep
    for flag, given, have, key in (("--tp", a.tp, tp, "parallel.tp"), ("--ep", a.ep, ep, "parallel.ep")):
        if given is not None:
            want = validate_positive_int(given, flag)
            if want != have:
                raise CheckError(f"{flag} {want} but the run config resolves {key}={have} (built-in default, "
                                 f"--config file, then --{key}=... overrides): pass --{key}={want} to training")
    check_sizes(world, tp, ep)
    try:
        cfg.validate(world)
    except ValueError as e:
        raise CheckError(f"run config at world size {world}: {e}") from None
    if cfg.train.precision == "fp16" and os.environ.get("DS_ACCELERATOR", "").lower() == "cpu":
        raise CheckError("train.precision=fp16 with DS_ACCELERATOR=cpu: DeepSpeed's CPU accelerator does not "
                         "support fp16 ('Type fp16 is not supported on your device'); use bf16 or fp32 on CPU")
    ds_path = targs.deepspeed_config
    if ds_path:
        check_ds_config(ds_path, cfg)
    return cfg


def _plan_lines(active: dict, source: str, cfg, addr: str, port: int, node_rank: Optional[int]) -> list[str]:
    """Step 4: the plan printed on success (a TP group across nodes is a warning)."""
    world, n_nodes = sum(len(s) for s in active.values()), len(active)
    tp, ep = cfg.parallel.tp, cfg.parallel.ep
    per_node = [len(s) for s in active.values()]
    rpn = str(per_node[0]) if len(set(per_node)) == 1 else "/".join(map(str, per_node))
    if tp > 1 and any(n % tp for n in per_node):
        warn(f"TP={tp} groups (consecutive ranks) cross node boundaries with {rpn} rank(s) per node: "
             f"tensor-parallel traffic would go over the network")
    lines = [f"launch plan: world {world} = {n_nodes} node(s) x {rpn} rank(s) per node ({source}); "
             f"TP {tp} x DP {world // tp}, "
             + (f"EP {ep} x EDP {world // ep}" if cfg.model.moe is not None else "dense model (no experts)")
             + f"; rendezvous {addr}:{port}"
             + (f"; this node is node_rank {node_rank}" if node_rank is not None else "")]
    first = 0
    items = list(active.items())
    for i, (host, slots) in enumerate(items):
        if i == 8 and len(items) > 9:
            lines.append(f"  ... and {len(items) - 8} more node(s)")
            break
        lines.append(f"  {host}: ranks {_ranges(list(range(first, first + len(slots))))} "
                     f"(slots {','.join(map(str, slots))})")
        first += len(slots)
    return lines


def check(a) -> list[str]:
    """Run every check; return the plan lines. Raises CheckError/ValueError on the first problem."""
    addr, port, launcher = _check_launcher_flags(a)
    active, source, node_rank = _check_nodes(a, launcher, addr)
    cfg = _check_run_config(a, launcher, sum(len(s) for s in active.values()), len(active))
    return _plan_lines(active, source, cfg, addr, port, node_rank)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        # Split at the first `--` by hand: argparse's handling of `--` differs between Python versions.
        cut = argv.index("--") if "--" in argv else len(argv)
        a = build_parser().parse_args(argv[:cut])
        a.train_args = argv[cut + 1:]
        lines = check(a)
    except (CheckError, ValueError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
