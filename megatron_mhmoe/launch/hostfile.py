"""Strict parsing and validation of DeepSpeed hostfiles, resource filters, ports and addresses.

DeepSpeed's own hostfile parser (deepspeed/launcher/runner.py, `^(\\S+)\\s+slots=(\\d+)`) accepts any
non-blank host token, e.g. `$(id)` or `a;touch${IFS}pwned`, and its pdsh backend pastes host names,
the master address and the training arguments into a shell command line that runs on every node.
Everything a launch script hands to a launcher is therefore checked here first, and a bad entry is a
ValueError that names the file, the line and the entry.

Hostfile format (MPI style, as DeepSpeed reads it):

    # comment
    worker-0 slots=8
    worker-1 slots=8   # trailing comment

Filters (`--include` / `--exclude`) use DeepSpeed's syntax: `NODE_SPEC[@NODE_SPEC ...]` with
`NODE_SPEC = NAME[:SLOT[,SLOT ...]]`, e.g. `worker-0@worker-1:0,2`. The filter semantics mirror
`deepspeed.launcher.runner.parse_resource_filter` (host order of the hostfile is kept; a bare name means
all of that host's slots; include and exclude are mutually exclusive), but unknown hosts, slots out of
range, malformed specs and filters that leave nothing are errors.

No import of torch or deepspeed: launch scripts run this before anything heavy starts.
"""
from __future__ import annotations

import ipaddress
import os
import re
from collections import OrderedDict
from typing import Optional

HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
"""Letters, digits, dots and hyphens; starts and ends with a letter or digit; at most 253 characters."""
_IPV4_SHAPE_RE = re.compile(r"^[0-9]+(\.[0-9]+){3}$")
_DIGITS_RE = re.compile(r"^[0-9]+$")
_SLOTS_RE = re.compile(r"^slots=(.*)$")

PORT_MIN, PORT_MAX = 1024, 65535


def _show(value: str) -> str:
    """repr() of a user value: quotes it and makes control characters and newlines visible."""
    return repr(value)


# ---------------------------------------------------------------------------------------- host names
def is_valid_hostname(name: str) -> bool:
    return isinstance(name, str) and bool(HOSTNAME_RE.match(name)) and ".." not in name


def validate_hostname(name: str, where: str = "host name") -> str:
    """Return `name` if it is a plain host name (or IPv4 address); ValueError naming `where` otherwise."""
    if not is_valid_hostname(name):
        raise ValueError(
            f"{where}: bad host name {_show(name)}: a host name may hold only letters, digits, '.' and '-', "
            f"must start and end with a letter or digit and be at most 253 characters (no spaces or shell "
            f"characters such as ; $ ` | & ( ) < > quotes)")
    if _IPV4_SHAPE_RE.match(name):
        _check_ipv4(name, where)
    return name


def _check_ipv4(value: str, where: str) -> None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"{where}: {_show(value)} looks like an IPv4 address but is not one "
                         f"(four numbers 0-255 without leading zeros)") from None


# ---------------------------------------------------------------------------------- ports / addresses
def validate_port(value, name: str = "port") -> int:
    """An integer TCP port in [1024, 65535] (given as int or as a string of digits)."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: {_show(str(value))} is not a port number")
    if isinstance(value, int):
        port = value
    else:
        text = str(value).strip()
        if not _DIGITS_RE.match(text):
            raise ValueError(f"{name}: {_show(str(value))} is not a port number "
                             f"(an integer {PORT_MIN}-{PORT_MAX})")
        port = int(text)
    if not PORT_MIN <= port <= PORT_MAX:
        raise ValueError(f"{name}: port {port} is out of range: use an integer {PORT_MIN}-{PORT_MAX} "
                         f"(ports below {PORT_MIN} need root)")
    return port


def validate_address(value: str, name: str = "address") -> str:
    """An IPv4 address or a host name (HOSTNAME_RE); nothing a shell would interpret."""
    if not isinstance(value, str) or value == "":
        raise ValueError(f"{name}: empty address: give an IPv4 address or a host name")
    if _IPV4_SHAPE_RE.match(value):
        _check_ipv4(value, name)
        return value
    if not is_valid_hostname(value):
        raise ValueError(
            f"{name}: bad address {_show(value)}: give an IPv4 address (e.g. 10.0.0.1) or a host name of "
            f"letters, digits, '.' and '-' (no spaces or shell characters)")
    return value


def validate_positive_int(value, name: str) -> int:
    """A positive integer given as int or digits (no sign, no spaces inside)."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: {_show(str(value))} is not a positive integer")
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip()
        if not _DIGITS_RE.match(text):
            raise ValueError(f"{name}: {_show(str(value))} is not a positive integer")
        n = int(text)
    if n < 1:
        raise ValueError(f"{name}: {n} is not a positive integer (must be >= 1)")
    return n


# ------------------------------------------------------------------------------------------ hostfile
def parse_hostfile_text(text: str, source: str = "<hostfile>") -> "OrderedDict[str, int]":
    """Parse hostfile text into {host: slots} in file order. ValueError names `source`, line and entry."""
    pool: "OrderedDict[str, int]" = OrderedDict()
    seen_lower: dict[str, tuple[str, int]] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        where = f"hostfile {source} line {lineno}"
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # A trailing comment must be separated by whitespace: `host slots=1 # note`.
        body = re.split(r"\s#", line, maxsplit=1)[0].strip()
        tokens = body.split()
        host = tokens[0]
        validate_hostname(host, f"{where} ({_show(raw.strip())})")
        if len(tokens) != 2:
            raise ValueError(f"{where}: bad entry {_show(raw.strip())}: expected exactly 'HOSTNAME slots=N'")
        m = _SLOTS_RE.match(tokens[1])
        if not m:
            raise ValueError(f"{where}: bad entry {_show(raw.strip())}: expected 'slots=N' after the host "
                             f"name, got {_show(tokens[1])}")
        slots_text = m.group(1)
        if not _DIGITS_RE.match(slots_text) or int(slots_text) < 1:
            raise ValueError(f"{where}: bad slots {_show(tokens[1])} for host {host!r}: slots must be a "
                             f"positive integer (slots=1, slots=8, ...)")
        key = host.lower()
        if key in seen_lower:
            first, first_line = seen_lower[key]
            raise ValueError(f"{where}: duplicate host {host!r} (already listed as {first!r} on line "
                             f"{first_line}; host names are case-insensitive): list each host once with "
                             f"its total slots")
        seen_lower[key] = (host, lineno)
        pool[host] = int(slots_text)
    if not pool:
        raise ValueError(f"hostfile {source} lists no hosts: add lines like 'worker-0 slots=8'")
    return pool


def parse_hostfile(path: str) -> "OrderedDict[str, int]":
    """Read and parse a hostfile; ValueError if it is missing, unreadable, not UTF-8 or invalid."""
    if not path:
        raise ValueError("hostfile: no path given")
    if not os.path.exists(path):
        raise ValueError(f"hostfile {path} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"hostfile {path} is not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"hostfile {path} cannot be read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"hostfile {path} line {line}: not UTF-8 text") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise ValueError(f"hostfile {path} line {line}: NUL byte (binary file?)")
    return parse_hostfile_text(text, source=path)


# ------------------------------------------------------------------------------------------ filters
def parse_filter(spec: str, kind: str = "include") -> "OrderedDict[str, list[int]]":
    """Parse `host1:0,1@host2` into {host: sorted slots} ([] = the whole host), validating every part."""
    where = f"--{kind} {_show(spec)}"
    if not isinstance(spec, str) or spec.strip() == "":
        raise ValueError(f"--{kind}: empty filter: use NAME[:SLOT[,SLOT...]][@NAME...], e.g. worker-0@worker-1:0,2")
    out: "OrderedDict[str, list[int]]" = OrderedDict()
    for node in spec.split("@"):
        if node == "":
            raise ValueError(f"{where}: empty node entry (stray '@'): use NAME[:SLOT[,SLOT...]] between '@'s")
        if node.count(":") > 1:
            raise ValueError(f"{where}: bad node entry {_show(node)}: at most one ':' (NAME:SLOT,SLOT)")
        name, sep, slot_text = node.partition(":")
        validate_hostname(name, f"{where}, entry {_show(node)}")
        slots: list[int] = []
        if sep:
            if slot_text == "":
                raise ValueError(f"{where}: entry {_show(node)} has ':' but no slots: write NAME or NAME:0,1")
            for s in slot_text.split(","):
                if not _DIGITS_RE.match(s):
                    raise ValueError(f"{where}: bad slot {_show(s)} in entry {_show(node)}: slots are "
                                     f"non-negative integers separated by ','")
                slots.append(int(s))
        # As in DeepSpeed, the slots of repeated entries add up; a host with no slots listed at all
        # means the whole host (so `h@h:0` is slot 0 only, exactly what DeepSpeed launches).
        out[name] = sorted(set(out.get(name, []) + slots))
    return out


def apply_filters(pool: "OrderedDict[str, int]", include: str = "", exclude: str = "",
                  source: str = "hostfile") -> "OrderedDict[str, list[int]]":
    """{host: slots} -> {host: [slot indices]} after an include or exclude filter (DeepSpeed semantics)."""
    include = include or ""
    exclude = exclude or ""
    if include and exclude:
        raise ValueError("--include and --exclude are mutually exclusive: give one of them")
    full: "OrderedDict[str, list[int]]" = OrderedDict((h, list(range(n))) for h, n in pool.items())
    if not include and not exclude:
        return full
    kind, spec = ("include", include) if include else ("exclude", exclude)
    parsed = parse_filter(spec, kind)
    for host, slots in parsed.items():
        if host not in pool:
            raise ValueError(f"--{kind} {_show(spec)}: host {host!r} is not in {source} "
                             f"(hosts: {', '.join(pool)})")
        for s in slots:
            if s >= pool[host]:
                raise ValueError(f"--{kind} {_show(spec)}: host {host!r} has slots 0-{pool[host] - 1} "
                                 f"(slots={pool[host]}), not slot {s}")
    result: "OrderedDict[str, list[int]]" = OrderedDict()
    for host, all_slots in full.items():
        if include:
            if host in parsed:
                result[host] = list(all_slots) if not parsed[host] else list(parsed[host])
        else:
            if host in parsed:
                keep = [] if not parsed[host] else [s for s in all_slots if s not in parsed[host]]
            else:
                keep = list(all_slots)
            result[host] = keep
    result = OrderedDict((h, s) for h, s in result.items() if s)
    if not result:
        raise ValueError(f"--{kind} {_show(spec)} leaves no slots to run on")
    return result


def apply_num_nodes_and_gpus(active: "OrderedDict[str, list[int]]", num_nodes: Optional[int] = None,
                             gpus_per_node: Optional[int] = None,
                             capacity: Optional["OrderedDict[str, int]"] = None) -> "OrderedDict[str, list[int]]":
    """DeepSpeed's --num_nodes (first N hosts) and --num_gpus (slots 0..G-1 on each), checked.

    DeepSpeed takes --num_gpus G on every host without comparing it with the host's slots; here a G above
    a host's slots (from `capacity`, the hostfile) is an error.
    """
    out = OrderedDict(active)
    if num_nodes is not None:
        if num_nodes > len(out):
            raise ValueError(f"--nodes {num_nodes} but the hostfile has only {len(out)} host(s): "
                             f"{', '.join(out)}")
        out = OrderedDict(list(out.items())[:num_nodes])
    if gpus_per_node is not None:
        for host in out:
            have = capacity[host] if capacity is not None else len(out[host])
            if gpus_per_node > have:
                raise ValueError(f"--gpus-per-node {gpus_per_node} but host {host!r} has slots={have} in the "
                                 f"hostfile")
        out = OrderedDict((h, list(range(gpus_per_node))) for h in out)
    return out
