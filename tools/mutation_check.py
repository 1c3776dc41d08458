#!/usr/bin/env python3
"""Mutation check: apply each one-line bug of tools/mutants.py to a scratch copy of the tree, run the tests
that must catch it, and report KILLED / SURVIVED / ERROR per mutant.

    .venv/bin/python tools/mutation_check.py              # every mutant (a baseline run of their tests first)
    .venv/bin/python tools/mutation_check.py --fast       # the quick subset (CI)
    .venv/bin/python tools/mutation_check.py --only z_loss_not_squared,resume_skips_rng
    .venv/bin/python tools/mutation_check.py --list       # names, files, tests; checks that each applies

The scratch copy leaves out .git, .venv, runs/ and caches, and is imported first (PYTHONPATH), so the
editable install of the real tree is never what the tests exercise; bytecode is not written, so a mutant
of the same size and mtime as the original cannot run from a stale .pyc. A mutant whose original text is
missing or occurs more than once is an ERROR: the code moves, and a mutant that silently no longer applies
would count as killed by nothing. Exit status 0 only if every selected mutant was killed.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mutants import MUTANTS, Mutant  # noqa: E402

SKIP_TOP = {".git", ".venv", "runs", ".whl", "wandb", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
SKIP_ANY = {"__pycache__"}
DEFAULT_TIMEOUT = 300


def package_of(m: Mutant) -> str:
    parts = m.file.split("/")
    return parts[1] if parts[0] == "megatron_mhmoe" and len(parts) > 2 else parts[0]


def apply_text(text: str, m: Mutant) -> tuple[str | None, str]:
    """(mutated text, '') or (None, why it does not apply)."""
    n = text.count(m.original)
    if n == 0:
        return None, f"original text not found in {m.file}: {m.original!r}"
    if n > 1:
        return None, f"original text occurs {n} times in {m.file}, must be unique: {m.original!r}"
    if m.original == m.replacement:
        return None, "replacement equals the original"
    return text.replace(m.original, m.replacement), ""


def check_applies(m: Mutant, root: str = ROOT) -> str:
    """'' if m applies to the tree at root, else the reason."""
    path = os.path.join(root, m.file)
    if not os.path.isfile(path):
        return f"no file {m.file}"
    with open(path, encoding="utf-8") as f:
        return apply_text(f.read(), m)[1]


def _ignore(folder: str, names: list[str]) -> set[str]:
    top = os.path.abspath(folder) == ROOT
    return {n for n in names if n in SKIP_ANY or (top and (n in SKIP_TOP or n.endswith(".egg-info")))}


def make_scratch(base: str, i: int) -> str:
    dst = os.path.join(base, f"tree{i}")
    shutil.copytree(ROOT, dst, ignore=_ignore, symlinks=True)
    return dst


def test_env(tree: str) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
               PYTHONDONTWRITEBYTECODE="1", DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"),
               WANDB_MODE="disabled", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def check_scratch_imports(python: str, tree: str) -> None:
    """The tests must import the scratch copy, not the installed tree."""
    out = subprocess.run([python, "-c", "import os, megatron_mhmoe.moe.layer as m; print(os.path.realpath(m.__file__))"],
                         cwd=tree, env=test_env(tree), capture_output=True, text=True, timeout=120)
    where = out.stdout.strip()
    if out.returncode != 0 or not where.startswith(os.path.realpath(tree) + os.sep):
        raise SystemExit(f"mutation_check: the scratch copy {tree} does not shadow the installed package "
                         f"(imported {where or out.stderr.strip()[-500:]})")


def run_tests(python: str, tree: str, tests: tuple[str, ...], timeout: int) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout' | 'error', seconds, output tail)."""
    cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tree, env=test_env(tree), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The tests may have started torchrun and workers: end the whole session they run in.
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        return "timeout", time.monotonic() - t0, out[-3000:]
    secs = time.monotonic() - t0
    if proc.returncode == 0:
        return "pass", secs, out[-3000:]
    if proc.returncode == 1:
        return "fail", secs, out[-3000:]
    return "error", secs, f"pytest exit {proc.returncode} (not a test failure)\n" + out[-3000:]


def run_mutant(m: Mutant, python: str, tree: str, timeout: int) -> tuple[str, float, str]:
    path = os.path.join(tree, m.file)
    with open(path, encoding="utf-8") as f:
        original = f.read()
    mutated, why = apply_text(original, m)
    if mutated is None:
        return "ERROR(mutant did not apply)", 0.0, why
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(mutated)
        outcome, secs, tail = run_tests(python, tree, m.tests, m.timeout or timeout)
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
    verdict = {"fail": "KILLED", "timeout": "KILLED(timeout)", "pass": "SURVIVED",
               "error": "ERROR(tests did not run)"}[outcome]
    return verdict, secs, tail


def select(args) -> list[Mutant]:
    names = [m.name for m in MUTANTS]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise SystemExit(f"mutation_check: duplicate mutant names {sorted(dupes)}")
    chosen = list(MUTANTS)
    if args.only:
        want = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in want if n not in names]
        if unknown:
            raise SystemExit(f"mutation_check: unknown mutant(s) {unknown}; --list shows the names")
        chosen = [m for m in chosen if m.name in want]
    if args.fast:
        chosen = [m for m in chosen if m.fast]
    return chosen


def list_mutants(chosen: list[Mutant]) -> int:
    bad = 0
    for m in chosen:
        why = check_applies(m)
        bad += bool(why)
        flag = "fast" if m.fast else "    "
        print(f"{m.name:36s} {package_of(m):9s} {flag} {m.file}  [{'applies' if not why else 'DOES NOT APPLY: ' + why}]")
        print(f"{'':36s} {m.description}")
        print(f"{'':36s} tests: {' '.join(m.tests)}")
    print(f"{len(chosen)} mutants, {sum(m.fast for m in chosen)} in --fast, {bad} not applying")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated mutant names")
    ap.add_argument("--list", action="store_true", help="list the mutants and check that each applies; run nothing")
    ap.add_argument("--fast", action="store_true", help="only the quick mutants (marked fast)")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run in parallel, one scratch copy each (default 1)")
    ap.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, help="seconds per mutant unless it sets its own")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the unmutated run of the selected tests (a failing baseline makes every kill void)")
    ap.add_argument("--python", default=None, help="interpreter with the test dependencies (default: ROOT/.venv, "
                                                   "else this one)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the end of each mutant's test output")
    args = ap.parse_args(argv)
    chosen = select(args)
    if args.list:
        return list_mutants(chosen)
    if not chosen:
        print("no mutants selected")
        return 2
    venv_python = os.path.join(ROOT, ".venv", "bin", "python")
    python = args.python or (venv_python if os.path.exists(venv_python) else sys.executable)
    jobs = max(1, min(args.jobs, len(chosen)))
    base = tempfile.mkdtemp(prefix="mutation_check.")
    t_start = time.monotonic()
    try:
        trees = [make_scratch(base, i) for i in range(jobs)]
        check_scratch_imports(python, trees[0])
        print(f"mutation_check: {len(chosen)} mutants, scratch {base}, python {python}, jobs {jobs}", flush=True)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            outcome, secs, tail = run_tests(python, trees[0], tests, max(args.timeout, 60) * 3)
            print(f"baseline (no mutant, {len(tests)} test targets): {outcome} in {secs:.1f}s", flush=True)
            if outcome != "pass":
                print(tail)
                print("mutation_check: the tests fail without any mutant; fix that first")
                return 2
        free = list(trees)
        results: dict[str, tuple[str, float, str]] = {}

        def one(m: Mutant):
            tree = free.pop()
            try:
                return m, run_mutant(m, python, tree, args.timeout)
            finally:
                free.append(tree)

        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            for m, (verdict, secs, tail) in pool.map(one, chosen):
                results[m.name] = (verdict, secs, tail)
                print(f"{verdict:28s} {secs:7.1f}s  {package_of(m):9s} {m.name:36s} {m.description}", flush=True)
                if verdict.startswith("ERROR(mutant"):
                    print(f"{'':39s} {tail}")
                elif args.verbose:
                    print("\n".join(tail.splitlines()[-25:]))
    finally:
        if args.keep:
            print(f"scratch kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    per_pkg: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # total, killed, survived, errors
    for m in chosen:
        v = results[m.name][0]
        row = per_pkg[package_of(m)]
        row[0] += 1
        row[1 if v.startswith("KILLED") else 2 if v == "SURVIVED" else 3] += 1
    print("\nsummary by package:")
    for pkg in sorted(per_pkg):
        t, k, s, e = per_pkg[pkg]
        print(f"  {pkg:10s} {k}/{t} killed, {s} survived, {e} errors")
    killed = sum(r[1] for r in per_pkg.values())
    survived = [m.name for m in chosen if results[m.name][0] == "SURVIVED"]
    errors = [m.name for m in chosen if results[m.name][0].startswith("ERROR")]
    print(f"total: {killed}/{len(chosen)} killed, {len(survived)} survived, {len(errors)} errors "
          f"in {time.monotonic() - t_start:.0f}s")
    if survived:
        print("survived: " + ", ".join(survived))
    if errors:
        print("errors: " + ", ".join(errors))
    return 0 if not survived and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
