"""The torch floor in requirements.txt is what the code needs: every torch API the package and tools use
unguarded is at most as new as the floor, the floor is set by one of them (named in the comment above
it), and APIs newer than the floor stay behind a hasattr guard. Adding a newer API without raising the
floor fails here, with the API and the file."""
from __future__ import annotations

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = ("megatron_mhmoe", "tools")

# (API, pattern in the source, first torch release with it, a line the pattern must match)
APIS = [
    ("torch.serialization.safe_globals",
     r"\bserialization\.safe_globals\b|from\s+torch\.serialization\s+import[^\n]*\bsafe_globals\b", (2, 5),
     "with torch.serialization.safe_globals([Foo]):"),
    ("torch.serialization.add_safe_globals", r"\badd_safe_globals\(", (2, 4),
     "torch.serialization.add_safe_globals([Foo])"),
    ("torch.nn.functional.rms_norm", r"\b(?:F|functional)\.rms_norm\(", (2, 4), "y = F.rms_norm(x, (d,), w, eps)"),
    ("torch.nn.RMSNorm", r"\bnn\.RMSNorm\b", (2, 4), "self.norm = nn.RMSNorm(d)"),
    ("torch.get_autocast_dtype", r"\bget_autocast_dtype\(", (2, 4), "dt = torch.get_autocast_dtype(dev)"),
    ("torch.is_autocast_enabled(device_type)", r"\bis_autocast_enabled\(\s*[^)\s]", (2, 4),
     "if not torch.is_autocast_enabled(dev):"),
    ("torch.nn.functional.scaled_dot_product_attention", r"\bscaled_dot_product_attention\(", (2, 0),
     "out = F.scaled_dot_product_attention(q, k, v, is_causal=True)"),
    ("torch.load(weights_only=...)", r"\bweights_only\s*=", (1, 13), "torch.load(p, weights_only=True)"),
    ("torch.utils.checkpoint.checkpoint(use_reentrant=...)", r"\buse_reentrant\s*=", (1, 11),
     "checkpoint(layer, x, use_reentrant=False)"),
]

# APIs newer than any floor we would set, used only where torch has them.
GUARDED = [("torch._grouped_mm", r"\btorch\._grouped_mm\(", 'hasattr(torch, "_grouped_mm")')]


def read(path: str) -> str:
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def torch_floor() -> tuple[tuple[int, ...], str]:
    """(floor, the comment block right above the torch line) from requirements.txt."""
    lines = read("requirements.txt").splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*torch\s*>=\s*([0-9][0-9.]*)\s*(?:#.*)?$", line)
        if m:
            comment = []
            for prev in reversed(lines[:i]):
                if not prev.lstrip().startswith("#"):
                    break
                comment.insert(0, prev)
            return tuple(int(p) for p in m.group(1).split(".")), "\n".join(comment)
    raise AssertionError("requirements.txt has no `torch>=X.Y` line")


def source_files() -> list[str]:
    files = []
    for top in SOURCES:
        files += sorted(glob.glob(os.path.join(REPO, top, "**", "*.py"), recursive=True))
    assert len(files) > 20, files
    return files


def uses() -> dict[str, list[str]]:
    """API -> the repository files that use it."""
    found: dict[str, list[str]] = {}
    for path in source_files():
        text = open(path).read()
        for api, pattern, _, _ in APIS:
            if re.search(pattern, text):
                found.setdefault(api, []).append(os.path.relpath(path, REPO))
    return found


def fmt(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


@pytest.mark.parametrize("api,pattern,since,example", APIS, ids=[a[0] for a in APIS])
def test_each_pattern_finds_its_api(api, pattern, since, example):
    assert re.search(pattern, example), f"the pattern for {api} misses {example!r}"


def test_floor_covers_every_api_the_code_uses():
    floor, _ = torch_floor()
    used = uses()
    assert used, "no listed API found: the source scan is broken"
    since = {api: v for api, _, v, _ in APIS}
    too_new = [f"{api} (torch {fmt(since[api])}) in {', '.join(files)}"
               for api, files in used.items() if since[api] > floor]
    assert not too_new, f"requirements.txt says torch>={fmt(floor)} but the code uses: " + "; ".join(too_new)


def test_floor_is_set_by_a_used_api_named_above_it():
    floor, comment = torch_floor()
    since = {api: v for api, _, v, _ in APIS}
    needed = max(since[api] for api in uses())
    assert floor == needed, (f"torch>={fmt(floor)} but the newest API used needs {fmt(needed)}: lower the floor, "
                             f"or add the API that needs it to APIS here")
    setters = [api for api in uses() if since[api] == floor]
    assert any(api in comment for api in setters), \
        f"the comment above torch>={fmt(floor)} in requirements.txt should name {' or '.join(setters)}"


@pytest.mark.parametrize("api,pattern,guard", GUARDED, ids=[g[0] for g in GUARDED])
def test_newer_apis_stay_behind_a_guard(api, pattern, guard):
    for path in source_files():
        text = open(path).read()
        if re.search(pattern, text):
            assert guard in text, f"{os.path.relpath(path, REPO)} calls {api} without `{guard}`"


def test_other_pins_agree_with_the_floor():
    floor, _ = torch_floor()
    # pyproject leaves dependencies to requirements.txt; if it ever lists torch, the same floor.
    for m in re.finditer(r"[\"']torch\s*>=\s*([0-9.]+)[\"']", read("pyproject.toml")):
        assert tuple(int(p) for p in m.group(1).split(".")) == floor, "pyproject.toml's torch floor differs"
    pin = re.search(r"^torch==([0-9]+)\.([0-9]+)", read("constraints/cpu.txt"), re.M)
    assert pin and (int(pin.group(1)), int(pin.group(2))) >= floor[:2], "constraints/cpu.txt pins a torch below the floor"


def test_nodeps_requirements_are_installed_without_their_dependencies():
    """megatron-core (the routing oracle) asks for torch>=2.6, above the floor: setup_env.sh installs
    requirements-nodeps.txt with --no-deps, and its checksum covers the file (a change reinstalls)."""
    script = read("tools/setup_env.sh")
    assert re.search(r"--no-deps -r requirements-nodeps\.txt", script)
    assert "requirements-nodeps.txt" in script.split("cksum")[0]
    assert re.search(r"^megatron-core==[0-9.]+$", read("requirements-nodeps.txt"), re.M)
    assert "requirements-nodeps.txt" in read("requirements-dev.txt")
