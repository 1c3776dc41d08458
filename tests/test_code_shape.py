"""The shape of the code a reader meets: no function over 80 lines (in the package, the user-facing tools and the
benchmarks), every user-facing tools/*.py a thin command (at most 80 lines: it parses arguments and calls
package functions), and no tool or test that loads a tool by its file path.

The mutation harness (tools/mutation_check.py, tools/mutants.py) is development tooling and is left out.
"""
from __future__ import annotations

import ast
import functools
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FUNCTION_LINES = 80
MAX_TOOL_LINES = 80
DEV_TOOLING = {"tools/mutation_check.py", "tools/mutants.py"}


def _py_files(top: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
        out += [os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/")
                for f in files if f.endswith(".py")]
    return sorted(out)


@functools.lru_cache(maxsize=None)
def _tree(rel: str, root: str = ROOT) -> ast.AST:
    with open(os.path.join(root, rel), encoding="utf-8") as f:
        return ast.parse(f.read(), rel)


def _user_tools() -> list[str]:
    return [rel for rel in _py_files("tools") if rel not in DEV_TOOLING]


def long_functions(rel: str, root: str = ROOT) -> list[str]:
    """`file:line name (N lines)` for each function or method of `rel` longer than MAX_FUNCTION_LINES."""
    return [f"{rel}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(_tree(rel, root)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_over_80_lines():
    files = _py_files("megatron_mhmoe") + _user_tools() + _py_files("benchmarks")
    assert len(files) > 100
    found = [f for rel in files for f in long_functions(rel)]
    assert not found, "split these into named steps: " + "; ".join(found)


def test_the_length_rule_sees_a_long_method(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    (tmp_path / "m.py").write_text(f"def short():\n    pass\n\n\nclass A:\n    def long(self):\n{body}\n"
                                   f"        return 0\n")
    assert long_functions("m.py", str(tmp_path)) == [f"m.py:6 long ({MAX_FUNCTION_LINES + 1} lines)"]


def test_user_facing_tools_are_thin_commands():
    tools = _user_tools()
    assert {"tools/reshard_checkpoint.py", "tools/export_checkpoint.py", "tools/export_hf.py", "tools/generate.py",
            "tools/evaluate.py"} <= set(tools)
    sizes = {rel: sum(1 for _ in open(os.path.join(ROOT, rel), encoding="utf-8")) for rel in tools}
    assert not {rel: n for rel, n in sizes.items() if n > MAX_TOOL_LINES}, \
        f"move the logic into the package: {sizes}"
    for rel in tools:  # a command's definitions: its parser and main, nothing the package should hold
        defs = [n.name for n in _tree(rel).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert set(defs) <= {"build_parser", "main"}, (rel, defs)


def _loads_by_path(rel: str) -> list[str]:
    """Places where this file loads a tool by its path: spec_from_file_location / runpy.run_path on a path
    naming tools/, or tools/ put on sys.path."""
    found = []
    for node in ast.walk(_tree(rel)):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        if name not in ("spec_from_file_location", "run_path", "insert", "append"):
            continue
        text = ast.unparse(node)
        if (name in ("spec_from_file_location", "run_path") or text.startswith("sys.path.")) and "tools" in text:
            found.append(f"{rel}:{node.lineno} {text}")
    return found


def test_no_tool_or_test_loads_a_tool_by_path():
    files = _user_tools() + [rel for rel in _py_files("tests") if rel != "tests/test_code_shape.py"] \
        + _py_files("benchmarks") + _py_files("megatron_mhmoe")
    found = [f for rel in files for f in _loads_by_path(rel)
             if "mutation_check" not in f]  # the harness's own test may load the harness
    assert not found, "import the package function instead (or run the tool as a subprocess): " + "; ".join(found)
