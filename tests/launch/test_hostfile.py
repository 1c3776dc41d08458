"""Hostfile parser, resource filters, port/address helpers (megatron_mhmoe.launch.hostfile)."""
from __future__ import annotations

from collections import OrderedDict

import pytest

from megatron_mhmoe.launch import hostfile as H


def write(tmp_path, text: str, name: str = "hostfile"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ------------------------------------------------------------------------------------ good hostfiles
def test_good_hostfile_keeps_order_and_slots(tmp_path):
    path = write(tmp_path, "worker-1 slots=8\nworker-0 slots=4\n10.0.0.3 slots=2\n")
    assert H.parse_hostfile(path) == OrderedDict([("worker-1", 8), ("worker-0", 4), ("10.0.0.3", 2)])
    assert list(H.parse_hostfile(path)) == ["worker-1", "worker-0", "10.0.0.3"]


def test_comments_blank_lines_tabs_crlf_trailing_comment(tmp_path):
    text = ("# cluster A\n\n   \n  # indented comment\nnode0\tslots=2   # two GPUs\r\n"
            "node1.cluster.local   slots=16\r\n# end\n")
    assert H.parse_hostfile(write(tmp_path, text)) == OrderedDict([("node0", 2), ("node1.cluster.local", 16)])


def test_single_character_and_max_length_names():
    assert H.parse_hostfile_text("a slots=1") == {"a": 1}
    long = "a" * 253
    assert H.parse_hostfile_text(f"{long} slots=1") == {long: 1}
    with pytest.raises(ValueError, match="bad host name"):
        H.parse_hostfile_text("a" * 254 + " slots=1")


# ------------------------------------------------------------------------------------- bad hostfiles
BAD_NAMES = [
    "a;touch pwned",
    "$(id)",
    "$(touch pwned)",
    "`id`",
    "a`id`b",
    "host|cat",
    "host&",
    "host>x",
    "'quoted'",
    '"dq"',
    "a$IFS",
    "-leading",
    "trailing-",
    ".dot",
    "under_score",
    "hóst",
    "a..b",
    "x\\y",
    "h*",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_host_names_are_refused_naming_file_line_and_entry(tmp_path, name):
    path = write(tmp_path, f"# ok\ngood-0 slots=1\n{name} slots=1\n")
    with pytest.raises(ValueError) as e:
        H.parse_hostfile(path)
    msg = str(e.value)
    assert path in msg and "line 3" in msg
    assert repr(name.split()[0]) in msg or repr(name) in msg


def test_malicious_line_message_shows_whole_line(tmp_path):
    path = write(tmp_path, "a;touch pwned slots=1\n")
    with pytest.raises(ValueError) as e:
        H.parse_hostfile(path)
    assert "'a;touch pwned slots=1'" in str(e.value) and "line 1" in str(e.value)


@pytest.mark.parametrize("line", ["my host slots=1", "node0 slots=1 extra", "node0", "node0 slots = 2",
                                  "node0 max_slots=2", "node0 slots=2 max_slots=4"])
def test_spaces_and_extra_or_missing_tokens(line):
    with pytest.raises(ValueError, match=r"hostfile hf line 1"):
        H.parse_hostfile_text(line, "hf")


@pytest.mark.parametrize("slots", ["slots=x", "slots=0", "slots=-1", "slots=", "slots=1.5", "slots=+2",
                                   "slots=2a", "slots=0x10", "slots=$(id)"])
def test_bad_slots(slots):
    with pytest.raises(ValueError) as e:
        H.parse_hostfile_text(f"node0 slots=1\nnode1 {slots}\n", "hf")
    assert "line 2" in str(e.value) and repr(slots) in str(e.value)


def test_duplicate_hosts_case_insensitive():
    with pytest.raises(ValueError, match=r"line 3: duplicate host 'node0' \(already listed as 'node0' on line 1"):
        H.parse_hostfile_text("node0 slots=1\nnode1 slots=1\nnode0 slots=2\n", "hf")
    with pytest.raises(ValueError, match="duplicate host 'NODE0'"):
        H.parse_hostfile_text("node0 slots=1\nNODE0 slots=1\n", "hf")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  # another\n"])
def test_empty_hostfile(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match="lists no hosts") as e:
        H.parse_hostfile(path)
    assert path in str(e.value)


def test_missing_directory_binary_and_non_utf8(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        H.parse_hostfile(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="not a regular file"):
        H.parse_hostfile(str(tmp_path))
    (tmp_path / "bin").write_bytes(b"node0 slots=1\nnode1\x00 slots=1\n")
    with pytest.raises(ValueError, match="line 2: NUL byte"):
        H.parse_hostfile(str(tmp_path / "bin"))
    (tmp_path / "latin1").write_bytes(b"node0 slots=1\nn\xe9ud slots=1\n")
    with pytest.raises(ValueError, match="line 2: not UTF-8"):
        H.parse_hostfile(str(tmp_path / "latin1"))
    with pytest.raises(ValueError, match="no path"):
        H.parse_hostfile("")


# ------------------------------------------------------------------------------------------- filters
POOL = OrderedDict([("node0", 4), ("node1", 4), ("node2", 2)])


def test_no_filter_is_every_slot():
    assert H.apply_filters(POOL) == {"node0": [0, 1, 2, 3], "node1": [0, 1, 2, 3], "node2": [0, 1]}


@pytest.mark.parametrize("include,expected", [
    ("node1", {"node1": [0, 1, 2, 3]}),
    ("node1:0,2@node0", {"node0": [0, 1, 2, 3], "node1": [0, 2]}),  # hostfile order kept
    ("node2:1@node2:0", {"node2": [0, 1]}),
    ("node0@node0:1", {"node0": [1]}),  # as DeepSpeed: the listed slots of a repeated host win
    ("node0:3,3,1", {"node0": [1, 3]}),
])
def test_include(include, expected):
    assert H.apply_filters(POOL, include=include) == expected


@pytest.mark.parametrize("exclude,expected", [
    ("node1", {"node0": [0, 1, 2, 3], "node2": [0, 1]}),
    ("node0:0,1@node2:1", {"node0": [2, 3], "node1": [0, 1, 2, 3], "node2": [0]}),
    ("node2:0,1", {"node0": [0, 1, 2, 3], "node1": [0, 1, 2, 3]}),
])
def test_exclude(exclude, expected):
    assert H.apply_filters(POOL, exclude=exclude) == expected


@pytest.mark.parametrize("include", ["node1", "node1:0,2@node0", "node0@node0:1", "node2:1@node0:3"])
def test_filters_match_deepspeed(include):
    runner = pytest.importorskip("deepspeed.launcher.runner")
    assert dict(H.apply_filters(POOL, include=include)) == dict(runner.parse_inclusion_exclusion(POOL, include, ""))
    assert dict(H.apply_filters(POOL, exclude=include)) == dict(runner.parse_inclusion_exclusion(POOL, "", include))


@pytest.mark.parametrize("spec,match", [
    ("node9", "host 'node9' is not in"),
    ("node2:2", "has slots 0-1"),
    ("node0:", "has ':' but no slots"),
    ("node0:a", "bad slot 'a'"),
    ("node0:-1", "bad slot '-1'"),
    ("node0:0,,1", "bad slot ''"),
    ("@node0", "empty node entry"),
    ("node0@@node1", "empty node entry"),
    ("node0:0:1", "at most one ':'"),
    ("$(id)", "bad host name"),
    ("node0;touch pwned", "bad host name"),
    ("node0:0;id", "bad slot"),
    ("`id`:0", "bad host name"),
    ("node 0", "bad host name"),
    ("", "empty filter"),
])
def test_bad_filters(spec, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        if spec == "":
            H.parse_filter(spec)
        else:
            H.apply_filters(POOL, include=spec)


def test_filter_errors_name_the_option_and_spec():
    with pytest.raises(ValueError, match=r"^--exclude 'node0;x'"):
        H.apply_filters(POOL, exclude="node0;x")
    with pytest.raises(ValueError, match="mutually exclusive"):
        H.apply_filters(POOL, include="node0", exclude="node1")
    with pytest.raises(ValueError, match="leaves no slots"):
        H.apply_filters(POOL, exclude="node0@node1@node2")


def test_num_nodes_and_gpus():
    full = H.apply_filters(POOL)
    assert H.apply_num_nodes_and_gpus(full, 2, None, POOL) == {"node0": [0, 1, 2, 3], "node1": [0, 1, 2, 3]}
    assert H.apply_num_nodes_and_gpus(full, None, 2, POOL) == {"node0": [0, 1], "node1": [0, 1], "node2": [0, 1]}
    with pytest.raises(ValueError, match="--nodes 4 but the hostfile has only 3"):
        H.apply_num_nodes_and_gpus(full, 4, None, POOL)
    with pytest.raises(ValueError, match="--gpus-per-node 4 but host 'node2' has slots=2"):
        H.apply_num_nodes_and_gpus(full, None, 4, POOL)


# ----------------------------------------------------------------------------------- ports, addresses
@pytest.mark.parametrize("value,port", [(1024, 1024), ("29500", 29500), (" 65535 ", 65535)])
def test_good_ports(value, port):
    assert H.validate_port(value) == port


@pytest.mark.parametrize("value", [80, 0, 1023, 65536, "70000", "29500;id", "$(id)", "", " ", "1e4", "-1",
                                   "+2000", "0x7000", True, "29 500", None])
def test_bad_ports(value):
    with pytest.raises(ValueError, match="MASTER_PORT"):
        H.validate_port(value, "MASTER_PORT")


@pytest.mark.parametrize("addr", ["10.0.0.1", "127.0.0.1", "192.168.1.254", "localhost", "node-0.cluster.local",
                                  "n1"])
def test_good_addresses(addr):
    assert H.validate_address(addr) == addr


@pytest.mark.parametrize("addr", ["$(id)", "$(touch pwned)", "`id`", "10.0.0.1;id", "a b", "", "10.0.0.256",
                                  "10.0.0.01", "-x", "x-", "host_name", "10.0.0.1 ", "::1", "10.0.0.1:29500",
                                  "a|b", "a\nb"])
def test_bad_addresses(addr):
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        H.validate_address(addr, "MASTER_ADDR")


def test_positive_int():
    assert H.validate_positive_int("8", "n") == 8
    for bad in ("0", "-1", "x", "1;id", "", 0, True):
        with pytest.raises(ValueError, match="n:"):
            H.validate_positive_int(bad, "n")
