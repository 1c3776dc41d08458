"""benchmarks/gpu_check.sh, the prepared one-GPU check, tested without a GPU.

- SMOKE TEST OF THE SCRIPT'S PLUMBING (not of any GPU): `--cpu-smoke` runs the same six checks on the CPU
  with tiny sizes (grouped-GEMM self-test, moe_layer --quick, 4 ZeRO-1 bf16 steps, resume to 6, reshard
  to ZeRO-2 and 2 steps, export + logits); every CHECK line must say PASS, the summary must count 6 passed
  and 0 failed, the exit code must be 0, and the log must be saved in the run folder;
- without a usable GPU the full mode refuses at once: one line, exit code 2, before any venv work.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from gpu_check import CHECKS  # noqa: E402


def gpu_check(args: list[str], env: dict | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    base = {k: v for k, v in os.environ.items() if k not in ("GPU_CHECK_VENV", "GPU_CHECK_PYTHON")}
    t0 = time.monotonic()
    res = subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env={**base, **(env or {})}, capture_output=True,
                         text=True, timeout=timeout)
    return res, time.monotonic() - t0


def nvidia_smi_works() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return r.returncode == 0 and "GPU " in r.stdout


def test_cpu_smoke_plumbing_all_checks_pass(tmp_path):
    """Smoke test of gpu_check.sh's plumbing on the CPU; says nothing about a GPU."""
    out = tmp_path / "run"
    # The interpreter running the tests already has every package: the test must not build or update a venv.
    res, seconds = gpu_check(["--cpu-smoke", "--out", str(out)], {"GPU_CHECK_PYTHON": sys.executable})
    text = res.stdout + res.stderr
    print(f"gpu_check.sh --cpu-smoke: {seconds:.0f} s")
    print("\n".join(ln for ln in res.stdout.splitlines() if ln.startswith(("CHECK ", "GPU CHECK"))))
    lines = res.stdout.splitlines()
    checks = [ln for ln in lines if ln.startswith("CHECK ")]
    # Each check's line as it goes, then once more in the summary block.
    assert [ln.split()[1] for ln in checks] == CHECKS + CHECKS, text[-4000:]
    failed = [ln for ln in checks if ln.split()[2] != "PASS"]
    assert not failed, "\n".join(failed) + "\n" + text[-4000:]
    summary = [ln for ln in lines if ln.startswith("GPU CHECK:")]
    assert len(summary) == 1 and re.match(r"GPU CHECK: 6 passed, 0 failed\b", summary[0]), summary
    assert res.returncode == 0, text[-4000:]
    # Figures the brief asks for are on the lines (names, not values: CPU values mean nothing).
    by_name = {ln.split()[1]: ln for ln in checks}
    assert "TFLOP/s" in by_name["moe-layer-bench"] and "of peak" in by_name["moe-layer-bench"]
    assert "tokens/s" in by_name["train-zero1-bf16"] and "MFU" in by_name["train-zero1-bf16"]
    assert "all_to_all_s" in by_name["train-zero1-bf16"]
    assert "resumed at step 4" in by_name["resume-zero1"]
    assert "vs ZeRO-1" in by_name["reshard-zero2"] and "finite" in by_name["export-logits"]
    log = (out / "gpu_check.log").read_text()
    assert summary[0] in log and all(ln in log for ln in checks)
    assert (out / "zero1" / "metrics.jsonl").exists() and (out / "export" / "model.safetensors").exists()


def _assert_refused(res: subprocess.CompletedProcess, seconds: float, out, want: str) -> None:
    text = (res.stdout + res.stderr).strip()
    assert res.returncode == 2, text
    assert len(text.splitlines()) == 1 and want in text and "needs one CUDA GPU" in text, text
    assert seconds < 20, f"refusal took {seconds:.1f} s"
    assert not out.exists(), "refused runs must not create a run folder (or build anything)"


def test_full_mode_refuses_when_gpus_are_hidden(tmp_path):
    """CUDA_VISIBLE_DEVICES='' hides every GPU on any machine: refused before the venv step."""
    out = tmp_path / "run"
    res, seconds = gpu_check(["--out", str(out)], {"CUDA_VISIBLE_DEVICES": ""}, timeout=60)
    _assert_refused(res, seconds, out, "CUDA_VISIBLE_DEVICES")


@pytest.mark.skipif(nvidia_smi_works(), reason="this machine has an NVIDIA GPU: the full check would run")
def test_full_mode_refuses_without_nvidia_gpu(tmp_path):
    out = tmp_path / "run"
    env = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0") or "0"}
    res, seconds = gpu_check(["--out", str(out)], env, timeout=60)
    _assert_refused(res, seconds, out, "no NVIDIA GPU found")


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here: the full check would run")
def test_full_mode_refuses_when_torch_sees_no_cuda(tmp_path):
    """nvidia-smi lists a GPU but the interpreter's torch cannot use it (e.g. a CPU build): the driver's
    probe refuses with one line and exit 2 instead of running six failing checks."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    out = tmp_path / "run"
    env = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "GPU_CHECK_PYTHON": sys.executable,
           "CUDA_VISIBLE_DEVICES": "0"}
    res, seconds = gpu_check(["--out", str(out)], env, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check: torch ") and "sees no CUDA device" in last, res.stdout
    assert "CHECK " not in res.stdout
    assert "sees no CUDA device" in (out / "gpu_check.log").read_text()
