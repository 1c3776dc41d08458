"""The documentation site builds with `mkdocs build --strict` (mkdocs.yml over docs/): a broken link, a
missing anchor or a page left out of the nav fails the suite. The same build over a copy of docs/ with one
planted broken anchor must fail, so the strictness itself is checked."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mkdocs_build(config: str, site: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", config,
                           "--site-dir", site], capture_output=True, text=True, env=env, timeout=300)


def test_docs_build_strictly(tmp_path):
    r = mkdocs_build(os.path.join(ROOT, "mkdocs.yml"), str(tmp_path / "site"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for page in ("index", "reliability", "training-and-launch", "benchmark-results"):
        assert (tmp_path / "site" / ("" if page == "index" else page) / "index.html").exists(), page


def test_a_broken_anchor_fails_the_build(tmp_path):
    shutil.copytree(os.path.join(ROOT, "docs"), tmp_path / "docs", symlinks=False)
    shutil.copy(os.path.join(ROOT, "mkdocs.yml"), tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "performance.md"
    page.write_text(page.read_text().replace("(benchmark-results.md)", "(benchmark-results.md#no-such-heading)", 1))
    r = mkdocs_build(str(tmp_path / "mkdocs.yml"), str(tmp_path / "site"))
    assert r.returncode != 0 and "no-such-heading" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
