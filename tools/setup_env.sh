#!/usr/bin/env bash
# Create or reuse a virtual environment with everything the project needs.
#   bash tools/setup_env.sh [VENV_DIR]      (default .venv)
# On a machine without a working nvidia-smi the CPU torch is pinned (constraints/cpu.txt), so no
# multi-GB CUDA build is downloaded. Set MHMOE_FORCE_CPU=1 / MHMOE_FORCE_GPU=1 to override the
# detection, MHMOE_TORCH_INDEX to add a torch wheel index (e.g. https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
stamp="$venv/.mhmoe-installed"
want="$(cat requirements.txt requirements-dev.txt requirements-eval.txt requirements-nodeps.txt constraints/cpu.txt pyproject.toml | cksum)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup_env] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
extra=()
if [ -n "${MHMOE_TORCH_INDEX:-}" ]; then extra+=(--extra-index-url "$MHMOE_TORCH_INDEX"); fi
gpu=0
if [ "${MHMOE_FORCE_GPU:-0}" = 1 ]; then gpu=1
elif [ "${MHMOE_FORCE_CPU:-0}" != 1 ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1
fi
if [ "$gpu" = 1 ]; then
  echo "[setup_env] NVIDIA GPU found: installing requirements with the CUDA torch"
  "${pip[@]}" "${extra[@]}" -r requirements-dev.txt
else
  echo "[setup_env] no GPU: installing requirements with the CPU torch pinned (constraints/cpu.txt)"
  # torch first, alone, so nothing else can choose its build.
  "${pip[@]}" "${extra[@]}" -c constraints/cpu.txt torch
  "${pip[@]}" "${extra[@]}" -c constraints/cpu.txt -r requirements-dev.txt
fi
# Packages whose declared dependencies must not be taken (requirements-nodeps.txt says why).
"${pip[@]}" "${extra[@]}" --no-deps -r requirements-nodeps.txt
"${pip[@]}" --no-deps -e .
"$venv/bin/python" - <<'PY'
import torch, deepspeed  # noqa: F401  (fail here, not in the first test, if the install is broken)
print(f"[setup_env] torch {torch.__version__}, deepspeed {deepspeed.__version__}")
PY
echo "$want" > "$stamp"
