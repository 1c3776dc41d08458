"""README.md and the pages under docs/ state what the code does: the exit-code table, the checkpoint tools' exit
codes, the benchmark tables (benchmarks/RESULTS.md), counts and defaults they quote, every repository path,
dotted name and run-config option they mention, and the README's size.

Each test reads the page the text lives on, so editing a number there (or in the code) without the other fails.
Claims that need a training run are asserted by the tests the pages name next to them.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
README_MAX_BYTES = 12 * 1024
DOC_PAGES = sorted(p for p in glob.glob(os.path.join(ROOT, "docs", "*.md")) if not os.path.islink(p))
RESULTS_MD = os.path.join(ROOT, "benchmarks", "RESULTS.md")
EXIT_TABLE_HEADER = "| exit code | constant | meaning |"


def page(name: str) -> str:
    """The text of docs/<name>.md (the page a README section moved to)."""
    return open(os.path.join(ROOT, "docs", name + ".md"), encoding="utf-8").read()


def all_docs() -> dict[str, str]:
    """README.md and every page of docs/ (benchmark-results.md is a link to benchmarks/RESULTS.md)."""
    out = {"README.md": README}
    for path in DOC_PAGES + [RESULTS_MD]:
        out[os.path.relpath(path, ROOT)] = open(path, encoding="utf-8").read()
    return out


def load_script(relpath: str):
    name = os.path.splitext(os.path.basename(relpath))[0] + "_readme_claims"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


# ---------------------------------------------------------------------- exit codes
def readme_exit_table() -> dict[str, int]:
    tables = [name for name, text in all_docs().items() if EXIT_TABLE_HEADER in text]
    assert tables == ["docs/reliability.md"], f"exactly one page (reliability) has the table {EXIT_TABLE_HEADER!r}"
    lines = [line.strip() for line in page("reliability").splitlines()]
    assert lines.count(EXIT_TABLE_HEADER) == 1, f"docs/reliability.md needs one table headed {EXIT_TABLE_HEADER!r}"
    i = lines.index(EXIT_TABLE_HEADER) + 2  # skip the |---| row
    table = {}
    while i < len(lines) and lines[i].startswith("|"):
        cells = [c.strip() for c in lines[i].strip("|").split("|")]
        m = re.fullmatch(r"`(EXIT_\w+)`", cells[1])
        assert cells[0].isdigit() and m and cells[2], f"malformed exit-code row: {lines[i]}"
        assert m.group(1) not in table, f"{m.group(1)} listed twice"
        table[m.group(1)] = int(cells[0])
        i += 1
    return table


def test_exit_code_table_is_the_code_constants_both_ways():
    """Every constant of runtime/exit_codes.py is a row with its value, and every row is a constant: a
    renumbered, added or removed code fails until docs/reliability.md says so."""
    from megatron_mhmoe.runtime import exit_codes
    code = {k: v for k, v in vars(exit_codes).items() if k.startswith("EXIT_") and isinstance(v, int)}
    table = readme_exit_table()
    assert table == code, {"only in docs/reliability.md": sorted(set(table.items()) - set(code.items())),
                           "only in exit_codes.py": sorted(set(code.items()) - set(table.items()))}
    assert len(set(code.values())) == len(code), "two constants share a code"


def test_checkpoint_tools_exit_codes_are_the_readme_ones(capsys):
    """run_checkpoint_tool is what reshard_checkpoint.py and export_checkpoint.py return."""
    from megatron_mhmoe.runtime.checkpoint import CheckpointError
    from megatron_mhmoe.checkpoint.consolidate import run_checkpoint_tool
    m = re.search(r"checkpoint tools \(`tools/reshard_checkpoint.py`, `tools/export_checkpoint.py`\) exit (\d+) "
                  r"when done, (\d+) on a named problem .*?and (\d+) on a refused pickle", flat(page("reliability")))
    assert m, "docs/reliability.md's sentence on the checkpoint tools' exit codes is gone"
    done, named, pickle = map(int, m.groups())

    def raising(e):
        def work():
            raise e
        return work

    assert run_checkpoint_tool(lambda: None, "ckpt") == done
    assert run_checkpoint_tool(raising(CheckpointError("manifest missing")), "ckpt") == named
    assert run_checkpoint_tool(raising(FileNotFoundError("no such folder")), "ckpt") == named
    refused = RuntimeError("Weights only load failed ... Unsupported global: GLOBAL builtins.open")
    assert run_checkpoint_tool(raising(refused), "ckpt") == pickle
    assert "refusing to load ckpt" in capsys.readouterr().err
    for tool in ("tools/reshard_checkpoint.py", "tools/export_checkpoint.py"):
        assert "run_checkpoint_tool(" in open(os.path.join(ROOT, tool)).read(), tool


def test_generate_exit_code_is_the_readme_one(tmp_path):
    m = re.search(r"`tools/generate.py` exits (\d+) on bad arguments or an unreadable model folder", flat(page("reliability")))
    assert m, "docs/reliability.md's sentence on generate.py's exit code is gone"
    for args in (["--model", str(tmp_path / "missing"), "--prompt", "x", "--greedy"],
                 ["--model", str(tmp_path), "--prompt", "x", "--temperature", "0"]):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), *args], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == int(m.group(1)) and r.stderr.startswith("error: "), (args, r.stderr[-2000:])


# ---------------------------------------------------------------------- numbers
def test_benchmark_tables_are_summarize_of_the_committed_final_runs(capsys):
    """benchmarks/RESULTS.md's generated tables are, line for line, benchmarks/summarize.py over the committed
    final runs (3 moe_layer runs; the 3 two-node runs through moe_two_node.py --summarize), and
    `summarize.py --results RESULTS.md --check` agrees."""
    mod = load_script("benchmarks/summarize.py")
    runs = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", mod.FINAL_RUNS["moe_layer"])))
    results = open(RESULTS_MD, encoding="utf-8").read()
    assert len(runs) == 3 and "median of\n3 runs" in results
    assert mod.main(runs) == 0
    out = capsys.readouterr().out
    summary = out[out.index("Median over"):].strip().splitlines()
    assert summary[0] == "Median over 3 run(s) [min-max over runs]; ✓ = target met by the median."
    block = results[results.index("<!-- BEGIN generated: moe_layer -->"):results.index("<!-- END generated: moe_layer")]
    for line in summary:
        assert line in block.splitlines(), f"RESULTS.md lacks the summarize line {line!r}"
    assert mod.main(["--results", RESULTS_MD, "--check"]) == 0
    first = re.search(r"\| smoe \| 8 \| (\d\.\d{3})", block).group(0)
    stale = results.replace(first, first[:-1] + str((int(first[-1]) + 1) % 10))
    assert stale != results
    tmp = os.path.join(os.path.dirname(RESULTS_MD), ".RESULTS.stale-test.md")
    try:
        open(tmp, "w", encoding="utf-8").write(stale)
        assert mod.main(["--results", tmp, "--check"]) == 1  # a hand-edited table is caught
    finally:
        os.remove(tmp)
    for name in ("performance", "cross-node"):  # the pages point at the tables
        assert "(benchmark-results.md" in page(name), name


def test_main_job_numbers():
    """`make main`: 2 CPU processes, EP=2, 300 steps (launch/quickstart.sh + presets/quickstart.yaml)."""
    from megatron_mhmoe.launch.cli import resolve_config
    assert "on 2 CPU processes (EP=2)" in README and "trains for 300 steps" in README
    cfg = resolve_config(os.path.join(ROOT, "megatron_mhmoe", "presets", "quickstart.yaml"), [])
    assert cfg.train.train_steps == 300 and cfg.parallel.ep == 2
    assert 'NPROC="${NPROC:-2}"' in open(os.path.join(ROOT, "launch", "quickstart.sh")).read()


def test_bad_input_table_size():
    from tests.reliability import test_bad_inputs as t
    m = re.search(r"a table of (\d+) bad inputs", flat(page("reliability")))
    assert m
    # the matrix, plus its two incompatible-checkpoint launches and the never-overwrite preprocess run
    assert int(m.group(1)) == len(t.CASES) + 2 + 1


@pytest.mark.parametrize("preset,runs", [("cpu_mini_sweep", 27), ("activation_probe", 8),
                                            ("balancing_probe", 30)])
def test_sweep_preset_sizes(preset, runs):
    from megatron_mhmoe.scaling.plan import build_plan
    from megatron_mhmoe.scaling.spec import load_sweep
    # the comment line above each command gives its run count
    assert re.search(rf"\({runs} (tiny )?runs[^\n]*\n[^\n]*--preset {preset}\b", page("scaling-experiments")), preset
    spec, base = load_sweep(preset, [])
    assert len(build_plan(spec, base)) == runs


def test_quoted_defaults():
    from megatron_mhmoe.config import MoEConfig
    scaling, security = page("scaling-experiments"), page("security")
    assert "`activation_threshold` (0.5)" in scaling and MoEConfig().activation_threshold == 0.5
    assert "default 50M characters" in flat(security)
    parser_src = open(os.path.join(ROOT, "megatron_mhmoe", "data", "input_args.py")).read()  # preprocess_data
    assert re.search(r'"--max-doc-chars", type=int, default=50_000_000', parser_src)
    assert "(29500 by default)" in security
    for script in ("train_cpu.sh", "train_single_node.sh", "train_multi_node.sh"):
        assert 'MASTER_PORT="${MASTER_PORT:-29500}"' in open(os.path.join(ROOT, "launch", script)).read(), script


def test_shared_expert_defaults_and_kinds_are_the_readme_ones():
    from megatron_mhmoe.config import MoEConfig
    from megatron_mhmoe.scaling.spec import KINDS, SweepSpec
    text, scaling = flat(page("moe-and-routing")), page("scaling-experiments")
    assert "`num_shared_experts` (default 0 = none)" in text and MoEConfig().num_shared_experts == 0
    assert "`shared_expert_hidden_size` (default 0 = `expert_hidden_size`)" in text
    assert MoEConfig().shared_expert_hidden_size == 0
    assert "(sweep field, default 1)" in flat(scaling) and SweepSpec().num_shared_experts == 1
    for kind in KINDS:
        assert scaling.count(f"| `{kind}` |") == 1, kind  # each kind is one row of the table
    assert scaling.count("- `+shared` kinds:") == 1  # the matching equations once


def test_one_process_command_sets_the_ep_the_default_does_not():
    from megatron_mhmoe.runtime.run_config import program_defaults
    text = page("training-and-launch")
    assert "the built-in default is EP=2" in text and program_defaults().parallel.ep == 2
    assert "\n.venv/bin/python -m megatron_mhmoe.train --parallel.ep=1 " in text


# ---------------------------------------------------------------------- names
SHORT = ("runtime", "moe", "parallel", "model", "scaling")
TOP = ("megatron_mhmoe", "tools", "tests", "benchmarks", "launch", "ds_configs", "constraints")


def doc_paths(text: str) -> set[str]:
    dirs = "|".join(TOP + SHORT)
    return set(re.findall(rf"(?<![\w./<>-])((?:{dirs})/[\w./-]*\w)", text))


def _path_exists(p: str) -> bool:
    full = os.path.join(ROOT, p) if p.startswith(TOP) else os.path.join(ROOT, "megatron_mhmoe", p)
    if os.path.exists(full) or glob.glob(full + "*"):  # `run{1,2,3}.jsonl` / `run*.jsonl`: the files' prefix
        return True
    mod, _, attr = p.rpartition(".")
    if mod and os.path.exists(os.path.join(ROOT, "megatron_mhmoe", mod + ".py")):
        return hasattr(importlib.import_module("megatron_mhmoe." + mod.replace("/", ".")), attr)
    return False


def test_every_repository_path_in_the_docs_exists():
    """Paths under the checkout, in the README and every docs/ page; `runtime/x.py`-style short paths are under
    megatron_mhmoe/, and `runtime/engine.Engine` names an attribute of that module. The step breakdown's
    categories (`moe/router`, ...: runtime/step_breakdown.ORDER) are names, not paths."""
    from megatron_mhmoe.runtime.step_breakdown import ORDER  # the breakdown's categories read like paths
    missing = []
    for name, text in all_docs().items():
        missing += [f"{name}: {p}" for p in sorted(doc_paths(text)) if not _path_exists(p) and p not in ORDER]
    assert missing == []
    assert len(doc_paths(flat(" ".join(all_docs().values())))) > 100  # the pattern still finds the paths


def test_every_dotted_name_in_the_docs_resolves():
    names = set()
    for text in all_docs().values():
        names |= set(re.findall(r"\bmegatron_mhmoe(?:\.\w+)+", text))
    assert "megatron_mhmoe.parallel.devices.init_process_group" in names
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attr in parts[cut:]:
                assert hasattr(obj, attr), f"the docs name {name}, but {attr} is not in {obj}"
                obj = getattr(obj, attr)
            break
        else:
            pytest.fail(f"the docs name {name}, which does not import")


# `section.key` names of the run config, as `--train.lr=...` or `train.lr`; a file name such as train.py or
# model.safetensors, or a module such as parallel.grads, is not an option.
OPTION = re.compile(r"(?:(?<=--)|(?<![\w./-]))((?:model\.moe|model|parallel|train|data|wandb|tensorboard)\.[A-Za-z_]\w*)")
NOT_OPTIONS = {"py", "log", "safetensors", "json", "jsonl", "yaml"}


def test_every_run_config_option_in_the_docs_exists():
    """Every `train.x` / `--model.moe.y=` the README and the pages name is a field of the run-config dataclasses
    (a renamed or removed option fails until the docs follow)."""
    from megatron_mhmoe.runtime.run_config import program_defaults
    cfg, unknown, seen = program_defaults(), [], set()
    for name, text in all_docs().items():
        for option in OPTION.findall(text):
            parts = option.split(".")
            if parts[-1] in NOT_OPTIONS or os.path.exists(os.path.join(ROOT, "megatron_mhmoe", *parts) + ".py"):
                continue
            seen.add(option)
            obj = cfg
            for part in parts:
                if obj is None or not hasattr(obj, part):
                    unknown.append(f"{name}: {option}")
                    break
                obj = getattr(obj, part)
    assert unknown == []
    assert {"data.data_path", "train.progress_interval_s", "model.moe.gate", "parallel.timeout_s"} <= seen


def test_readme_is_short_and_links_every_page():
    """The README stays a front page (at most 12 KB); every docs/ page is linked from it, and every page opens
    with its title and a one-paragraph summary."""
    size = len(README.encode("utf-8"))
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}: move detail to docs/"
    for path in DOC_PAGES:
        name = os.path.relpath(path, ROOT)
        if name == os.path.join("docs", "index.md"):
            continue
        assert f"]({name})" in README, f"README.md does not link {name}"
        head = open(path, encoding="utf-8").read().split("\n\n")
        assert head[0].startswith("# ") and head[0].count("\n") == 0, name
        assert len(head[1]) > 150 and not head[1].startswith(("#", "- ", "```", "|")), f"{name}: no summary paragraph"
    assert "](benchmarks/RESULTS.md)" in README


def test_parallel_context_error_names_functions_that_exist():
    """The error of ParallelContext.from_world without torch.distributed tells the user what to call."""
    from megatron_mhmoe.parallel.context import ParallelContext
    with pytest.raises(ValueError) as info:
        ParallelContext.from_world(tp_size=2)
    named = re.findall(r"megatron_mhmoe(?:\.\w+)+", str(info.value))
    assert named
    for name in named:
        module, _, attr = name.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), name


def test_flops_matched_parameter_deviation():
    """The FLOPs-matched MH-MoE of the README example: the parameter deviations it quotes, rounded."""
    from megatron_mhmoe.moe import sizing
    from megatron_mhmoe.scaling import matching
    from tests.scaling.test_matching import SEQ, _ff_dense
    m = re.search(r"tested within 5%; ([-+]\d+\.\d)% and ([-+]\d+\.\d)% for these two",
                  flat(page("scaling-experiments")))
    assert m
    dense = _ff_dense()
    ref = sizing.count_params(matching.point("smoe", dense, 8, top_k=1).model)["total"]
    f_ref = sizing.flops_per_token(matching.point("smoe", dense, 8, top_k=1).model, SEQ)
    for h, quoted in zip((2, 3), m.groups()):
        model, _ = matching.point("mhmoe", dense, 8, h=h, mode="flops", top_k=1)
        assert f"{100 * (sizing.count_params(model)['total'] / ref - 1):+.1f}" == quoted, h
        assert abs(sizing.flops_per_token(model, SEQ) / f_ref - 1) < 1e-3


def test_apex_is_never_installed():
    assert "NVIDIA apex is never installed" in README
    for name in ("requirements.txt", "requirements-dev.txt", "constraints/cpu.txt", "pyproject.toml"):
        lines = [line.split("#")[0] for line in open(os.path.join(ROOT, name)).read().lower().splitlines()]
        assert not [line for line in lines if re.search(r"^\s*\"?apex\b", line)], name


def _sources(*dirs: str):
    for d in dirs:
        for path in glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True):
            yield os.path.relpath(path, ROOT), open(path, encoding="utf-8").read()


def test_checkpoints_are_never_unpickled():
    """Security: every torch.load that can see a checkpoint passes weights_only=True, and nothing calls
    DeepSpeed's load_checkpoint (which needs a full unpickle). parallel/spawn.py reads back the results
    its own worker processes wrote, never a checkpoint."""
    text = flat(page("security"))
    assert "read with `torch.load(weights_only=True)`" in text and "never calls it" in text
    loads = 0
    for rel, src in _sources("megatron_mhmoe", "tools"):
        assert not re.search(r"\.load_checkpoint\(", src), rel
        for call in re.findall(r"torch\.load\(([^()]*(?:\([^()]*\))?[^()]*)\)", src):
            if rel == os.path.join("megatron_mhmoe", "parallel", "spawn.py"):
                continue
            if call.strip() in ("weights_only=True",):  # the phrase in a docstring
                continue
            loads += 1
            assert "weights_only=True" in call, f"{rel}: torch.load({call})"
    assert loads >= 2  # runtime/checkpoint.py and checkpoint/consolidate.py


def _final_medians() -> dict:
    import statistics
    mod = load_script("benchmarks/summarize.py")
    runs = [mod.load(p) for p in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results",
                                                                mod.FINAL_RUNS["moe_layer"])))]
    keys = {(p["shape"], p["E"]) for p in runs[0]}
    return {key: {r: statistics.median(next(p for p in run if (p["shape"], p["E"]) == key)["ratios"][r]
                                       for run in runs)
                  for r in ("ours/floor", "ours/deepspeed", "deepspeed/floor", "mem ours/deepspeed")}
            for key in keys}, runs


def test_benchmark_shapes_and_missed_targets_are_the_committed_runs():
    """The compared shapes (4096 tokens, d=256, top-2, capacity 1.0; SMoE 256 -> 1024 -> 256, MH-MoE h=4:
    16384 sub-tokens 64 -> 1024 -> 64) and the missed-target figures quoted below the table."""
    med, runs = _final_medians()
    text = flat(page("performance"))
    assert "(4096 tokens, d=256, top-2, capacity factor 1.0)" in text
    assert "experts 256 -> 1024 -> 256; **MH-MoE** (h=4): 16384 sub-tokens, experts 64 -> 1024 -> 64" in text
    for run in runs:
        for p in run:
            assert (p["tokens"], p["d"], p["k"], p["capacity_factor"], p["ffn"], p["dtype"]) == \
                (4096, 256, 2, 1.0, 1024, "fp32")
            want = (1, 4096, 256) if p["shape"] == "smoe" else (4, 16384, 64)
            assert (p["h"], p["sub_tokens"], p["d_sub"]) == want, p["shape"]
    m = re.search(r"SMoE time against DeepSpeed at E=8 \((\d\.\d\d),.*?SMoE memory at E=64/256 "
                  r"\((\d\.\d\d\d)/(\d\.\d\d\d):.*?MH-MoE E=256 against\s+the floor \((\d\.\d\d\d):.*?DeepSpeed is at "
                  r"(\d\.\d)x the floor", text)
    assert m, "the missed-targets sentence is gone"
    got = [f"{med[('smoe', 8)]['ours/deepspeed']:.2f}", f"{med[('smoe', 64)]['mem ours/deepspeed']:.3f}",
           f"{med[('smoe', 256)]['mem ours/deepspeed']:.3f}", f"{med[('mhmoe', 256)]['ours/floor']:.3f}",
           f"{med[('mhmoe', 256)]['deepspeed/floor']:.1f}"]
    assert list(m.groups()) == got


def test_make_targets_are_the_readme_commands():
    """`make test` runs `pytest tests` (and `.ci/run` exactly `make test`), `make bench` is
    benchmarks/moe_layer.py, `make main` is launch/quickstart.sh."""
    make = open(os.path.join(ROOT, "Makefile")).read()

    def recipe(target):
        m = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", make, re.M)
        assert m, target
        return m.group(1).strip()

    testing, performance = page("testing"), page("performance")
    assert "`make test` runs `pytest tests`" in testing and re.fullmatch(r"\$\(PY\) -m pytest( -q)? tests",
                                                                          recipe("test"))
    assert "make bench                                        # = python benchmarks/moe_layer.py" in performance
    assert recipe("bench") == "$(PY) benchmarks/moe_layer.py"
    assert recipe("main").endswith("bash launch/quickstart.sh")
    assert "`.ci/run` runs exactly `make test`" in flat(testing)
    assert README.startswith("# megatron_mhmoe\n\n```bash\nmake main ") and "\nmake test " in README[:400]
    ci = [line for line in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci[-1] == "make test"


def test_router_eps_is_the_readme_one():
    from megatron_mhmoe.moe.router import NORMALIZE_EPS
    m = re.search(r"normalisation eps (\S+) ", flat(page("reliability")))
    assert m and float(m.group(1)) == NORMALIZE_EPS


def test_evaluation_figures_come_with_their_standard_error_and_chance():
    """The lm-eval figures of the `make main` model are stated as the harness reports them (standard error
    sqrt(p(1-p)/(n-1)) over the task's n items) against chance (1 / choices per item), in the README and on
    the export page. The accuracies are a measured run's; their standard errors, item count and chance level
    follow from the shipped task file and are checked here, as is the reading ("within one standard error")."""
    import json
    import math
    items = [json.loads(line) for line in open(os.path.join(ROOT, "tools", "eval_tasks", "next_line.jsonl"))]
    choices = {len(item["choices"]) for item in items}
    assert choices == {4}
    chance = 1 / choices.pop()
    readme = flat(README)
    m = re.search(r"next-line accuracy, (0\.\d+) with standard error (0\.\d+) over (\d+) items, is within one "
                  r"standard error of chance", readme)
    assert m and "chance (0.25: 4 choices per item)" in readme
    acc, se, n = float(m.group(1)), float(m.group(2)), int(m.group(3))
    assert n == len(items) and f"{math.sqrt(acc * (1 - acc) / (n - 1)):.3f}" == m.group(2) and chance == 0.25
    assert abs(acc - chance) < se  # the reading the README gives
    text = flat(page("checkpoints-and-export"))
    m = re.search(r"acc (0\.\d+) and acc_norm (0\.\d+), each with standard error (0\.\d+) over the (\d+) items, "
                  r"against chance (0\.\d+) \(4 choices\): within one standard error \(acc\) and under two "
                  r"\(acc_norm\) of chance", text)
    assert m, "docs/checkpoints-and-export.md's evaluation sentence is gone"
    acc, acc_norm, se, n, ch = float(m.group(1)), float(m.group(2)), float(m.group(3)), int(m.group(4)), float(m.group(5))
    assert n == len(items) and ch == chance
    for p in (acc, acc_norm):
        assert f"{math.sqrt(p * (1 - p) / (n - 1)):.3f}" == m.group(3)
    assert abs(acc - chance) < se and se <= abs(acc_norm - chance) < 2 * se


def test_package_map_names_what_is_in_the_package():
    """Every entry of the README's package map under megatron_mhmoe/ exists and every
    subpackage and top-level module of megatron_mhmoe/ is in the map."""
    block = README[README.index("## Package map"):]
    block = block[block.index("```\n") + 4:]
    block = block[:block.index("```")]
    entries = [line.split()[0] for line in block.splitlines()[1:] if line.startswith("  ") and line.strip()
               and not line.startswith("   ")]
    pkg = os.path.join(ROOT, "megatron_mhmoe")
    missing = [e for e in entries if not os.path.exists(os.path.join(pkg, e))]
    assert missing == [], f"the README's package map names {missing}, which megatron_mhmoe/ does not have"
    present = {n + "/" if os.path.isdir(os.path.join(pkg, n)) else n for n in os.listdir(pkg)
               if not n.startswith(("_", ".")) and (n.endswith(".py") or os.path.isdir(os.path.join(pkg, n)))}
    assert present - set(entries) == set(), "megatron_mhmoe/ has entries the README's package map lacks"


# ---------------------------------------------------------------------- step-throughput measurements
def _last_json(name: str) -> dict:
    import json
    with open(os.path.join(ROOT, "benchmarks", "results", name), encoding="utf-8") as f:
        return json.loads([line for line in f if line.startswith("{")][-1])


def _median_range(values: list) -> str:
    import statistics
    return f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"


def test_step_throughput_tables_quote_the_committed_runs():
    """docs/step-throughput.md's quiet-machine table and collective-latency table are the committed raw runs
    under benchmarks/results/ (medians, ranges, ratios, per-call times as the mean over ranks, the step
    estimate)."""
    import statistics
    text = page("step-throughput")
    run = _last_json("2026-12-08-train_throughput.txt")["tokens_per_s"]
    ratio = statistics.median(run["mhmoe"]) / statistics.median(run["dense"])
    assert f"| {_median_range(run['mhmoe'])} | {_median_range(run['dense'])} | **{ratio:.3f}** |" in text
    comp = _last_json("2026-12-08-train_throughput-compile.txt")["tokens_per_s"]
    for mode in ("eager", "compiled"):
        cells = f"| {_median_range(comp['mhmoe_' + mode])} | {_median_range(comp['dense_' + mode])} |"
        assert cells in text, cells
    lat = _last_json("2026-12-08-collective_latency.txt")
    res = lat["results"]
    for name, row in (("counts (8 int64)", "counts, 8 int64"),
                      ("rows (2048 x 32 fp32)", "rows, 2048 x 32 fp32 to the peer")):
        b2b, mid = res[f"{name} | back to back"], res[f"{name} | between compute"]
        cells = (f"| {row} | {statistics.mean(b2b['mean_per_rank']):.2f} | {statistics.mean(mid['mean_per_rank']):.2f} "
                 f"({mid['last_rank']:.2f}) |")
        assert cells in text, cells
    step = f"{lat['step_floor_ms']:.1f} ms when no rank is late, {lat['step_mean_ms']:.1f} ms at the measured"
    assert step in flat(text)
