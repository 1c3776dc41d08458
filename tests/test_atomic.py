"""megatron_mhmoe/atomic.py, the one module for atomic file writes: the target is the old file or the whole
new one, a failed write leaves no temporary behind, and no writer in the package renames files by itself."""
from __future__ import annotations

import ast
import json
import os

import pytest

from megatron_mhmoe import atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Boom(Exception):
    pass


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    atomic.write_json(str(path), {"a": 1})
    with pytest.raises(Boom):
        with atomic.atomic_open(str(path), "w") as f:
            f.write('{"half')
            raise Boom
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["out.json"]


def test_the_target_appears_only_when_the_block_ends(tmp_path):
    path = tmp_path / "data.bin"
    with atomic.atomic_open(str(path), "wb", fsync=True) as f:
        f.write(b"x" * 10)
        assert not path.exists()  # readers see nothing until the rename
    assert path.read_bytes() == b"x" * 10
    atomic.write_json(str(tmp_path / "k.json"), {"b": 2, "a": 1}, sort_keys=True)
    assert (tmp_path / "k.json").read_text() == '{\n "a": 1,\n "b": 2\n}\n'


def test_hidden_temporaries_start_with_dot_tmp_and_are_unique(tmp_path):
    path = str(tmp_path / "latest")
    names = {os.path.basename(atomic.temp_path(path, hidden=True)) for _ in range(20)}
    assert len(names) == 20 and all(n.startswith(".tmp-latest.") for n in names)
    assert os.path.basename(atomic.temp_path(path)).startswith("latest.tmp-")
    with atomic.atomic_path(path, hidden=True) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)  # same folder: the rename cannot cross filesystems
        with open(tmp, "w") as f:
            f.write("step_1")
    assert open(path).read() == "step_1" and os.listdir(tmp_path) == ["latest"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = str(tmp_path / "export")
    with atomic.atomic_dir(out) as d:
        open(os.path.join(d, "a"), "w").close()
    with pytest.raises(Boom):
        with atomic.atomic_dir(out, replace=True) as d:
            open(os.path.join(d, "b"), "w").close()
            raise Boom
    assert os.listdir(out) == ["a"] and os.listdir(tmp_path) == ["export"]
    with atomic.atomic_dir(out, replace=True) as d:
        open(os.path.join(d, "b"), "w").close()
    assert os.listdir(out) == ["b"] and os.listdir(tmp_path) == ["export"]


def test_atomic_open_refuses_append():
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic.atomic_open("x", "a"):
            pass


# Renames that are a protocol of their own, not a helper: the multi-rank checkpoint commit (every rank writes
# into one temporary folder, rank 0 renames it after a barrier), moving an unusable checkpoint aside, and the
# dataset writer's two-file commit (.bin then .idx, named by atomic.temp_path).
OWN_PROTOCOL = {"megatron_mhmoe/runtime/checkpoint.py": 2, "megatron_mhmoe/data/indexed.py": 2}


def test_no_other_module_renames_files_itself():
    found = {}
    for top in ("megatron_mhmoe", "tools"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
                if rel == "megatron_mhmoe/atomic.py":
                    continue
                tree = ast.parse(open(path, encoding="utf-8").read())
                n = sum(1 for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                        and (node.attr == "mkstemp" or node.attr in ("replace", "rename")
                             and isinstance(node.value, ast.Name) and node.value.id == "os"))
                if n:
                    found[rel] = n
    assert found == OWN_PROTOCOL, "write through megatron_mhmoe/atomic.py instead of os.replace/mkstemp"
