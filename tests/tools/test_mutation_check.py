"""tools/mutation_check.py without running any mutant: every mutant in tools/mutants.py applies to
today's tree (its original text occurs exactly once), names the tests that must catch it (which exist),
and `--list` works; a mutant whose text is gone is reported as not applying."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_harness():
    spec = importlib.util.spec_from_file_location("mutation_check", os.path.join(ROOT, "tools", "mutation_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mc = load_harness()


def test_enough_mutants_over_the_packages():
    pkgs = {}
    for m in mc.MUTANTS:
        pkgs.setdefault(mc.package_of(m), []).append(m.name)
    assert len(mc.MUTANTS) >= 30
    for pkg in ("moe", "parallel", "runtime", "data"):
        assert len(pkgs.get(pkg, [])) >= 4, (pkg, pkgs)
    assert len({m.name for m in mc.MUTANTS}) == len(mc.MUTANTS), "duplicate names"
    for required in ("resume_skips_rng", "z_loss_not_squared", "balance_counts_first_choice_only"):
        assert required in pkgs["runtime"] + pkgs["moe"]


@pytest.mark.parametrize("m", mc.MUTANTS, ids=[m.name for m in mc.MUTANTS])
def test_mutant_applies_to_todays_tree(m):
    assert mc.check_applies(m) == ""
    assert m.description and "\n" not in m.description
    assert m.tests, "a mutant must name the tests that catch it"
    for node in m.tests:
        assert os.path.isfile(os.path.join(ROOT, node.split("::")[0])), node


def test_missing_or_ambiguous_original_is_an_error():
    m = mc.MUTANTS[0]
    gone = mc.Mutant("gone", m.file, "this text is in no file", "x", "d", m.tests)
    assert "not found" in mc.check_applies(gone)
    twice = mc.Mutant("twice", m.file, "import", "x", "d", m.tests)
    assert "must be unique" in mc.check_applies(twice)
    assert mc.apply_text("a = 1\n", mc.Mutant("ok", "f", "1", "2", "d", ("t",)))[0] == "a = 2\n"


def test_fast_subset_is_nonempty_and_single_process():
    fast = [m for m in mc.MUTANTS if m.fast]
    assert len(fast) >= 10
    assert all(m.timeout == 0 for m in fast)


def test_list_option_runs_nothing_and_exits_zero():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "mutation_check.py"), "--list"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"{len(mc.MUTANTS)} mutants" in out.stdout and "0 not applying" in out.stdout
    assert "resume_skips_rng" in out.stdout
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "mutation_check.py"), "--only", "no_such"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unknown mutant" in bad.stderr


def test_docs_counts_are_the_mutants_file():
    """docs/testing.md's "one-line bugs in `tools/mutants.py` (N: ..." and "`--fast` runs M quick" are today's
    counts."""
    import re
    page = os.path.join(os.path.dirname(mc.__file__), "..", "docs", "testing.md")
    text = " ".join(open(page).read().split())
    total = re.search(r"one-line bugs in `tools/mutants.py` \((\d+):", text)
    fast = re.search(r"`--fast` runs (\d+) quick", text)
    assert total and fast, "docs/testing.md no longer states the mutant counts"
    assert int(total.group(1)) == len(mc.MUTANTS)
    assert int(fast.group(1)) == sum(m.fast for m in mc.MUTANTS)
