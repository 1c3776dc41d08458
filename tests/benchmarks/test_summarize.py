"""benchmarks/summarize.py reads every committed moe_layer result file, in both forms they exist in:
the printed output of moe_layer.py (`JSON {...}` among comment and log lines) and bare JSON lines."""
from __future__ import annotations

import glob
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
LAYER_FILES = sorted(glob.glob(os.path.join(RESULTS, "*moe_layer*.jsonl")))
POINTS = {(s, E) for s in ("smoe", "mhmoe") for E in (8, 32, 64, 256)}


def summarize():
    spec = importlib.util.spec_from_file_location("summarize", os.path.join(ROOT, "benchmarks", "summarize.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_files_hold_both_forms():
    firsts = [open(p).readline() for p in LAYER_FILES]
    assert any(line.startswith("JSON ") for line in firsts) and any(line.startswith("{") for line in firsts)


@pytest.mark.parametrize("path", LAYER_FILES, ids=os.path.basename)
def test_reads_every_committed_result_file(path, capsys):
    mod = summarize()
    points = mod.load(path)
    assert {(p["shape"], p["E"]) for p in points} == POINTS, path
    mod.main([path])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| smoe |", "| mhmoe |"))]
    assert len(rows) == 2 * len(POINTS)  # one per run and point, one per point in the summary


def test_both_forms_of_a_run_give_the_same_tables(tmp_path, capsys):
    mod = summarize()
    bare = next(p for p in LAYER_FILES if open(p).readline().startswith("{"))
    lines = [line for line in open(bare) if line.strip()]
    printed = tmp_path / "printed.txt"
    printed.write_text("# moe_layer: header\nNo existing process group found\n"
                       + "".join("JSON " + line for line in lines))
    mod.main([bare])
    from_bare = capsys.readouterr().out
    mod.main([str(printed)])
    assert capsys.readouterr().out == from_bare
    assert mod.load(str(printed)) == [json.loads(line) for line in lines]


def test_a_file_of_another_benchmark_is_refused_by_name():
    mod = summarize()
    path = os.path.join(RESULTS, "2026-12-01-moe_ep.jsonl")
    with pytest.raises(SystemExit, match="no moe_layer result lines"):
        mod.load(path)
