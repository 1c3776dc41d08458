#!/usr/bin/env bash
# Wheels for a GPU machine that has Python, CUDA torch and the common packages but no network (the project's
# lent H200 machines: Python 3.12, torch with CUDA, no deepspeed or pydantic). Run here, where pip reaches the
# package index; then carry .whl/ along and run `bash benchmarks/gpu_check.sh` there, which installs them
# into a temporary folder (no network) and uses that machine's own python3 and torch.
#   PY_VERSION (default 3.12)  OUT (default .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${PY_VERSION:-3.12}"
OUT="${OUT:-.whl}"
PIP="${PIP:-.venv/bin/python -m pip}"
mkdir -p "$OUT"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# deepspeed is an sdist that builds a pure-Python wheel (no ops compiled: DS_BUILD_OPS=0).
$PIP wheel -q --no-deps -w "$OUT" "deepspeed==0.19.8"
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp "${plat[@]}" -d "$OUT" \
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" "hjson==3.1.0"
ls -la "$OUT"
du -sh "$OUT"
