#!/usr/bin/env bash
# The README's main job (`make main`): build the built-in corpus (this machine's Python stdlib), train a
# SentencePiece tokenizer, preprocess to Megatron .bin/.idx, then train a small MH-MoE GPT on NPROC CPU
# processes with expert parallelism (EP=2), logging to wandb offline. Running it again resumes.
#   NPROC (default 2)  PYTHON (default .venv/bin/python)  extra args: --section.key=value overrides
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
NPROC="${NPROC:-2}"
case "$NPROC" in ''|*[!0-9]*) echo "NPROC must be a positive integer, got '$NPROC'" >&2; exit 2;; esac
export OMP_NUM_THREADS=1 DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" WANDB_MODE="${WANDB_MODE:-offline}"
PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# The wrapper (megatron_mhmoe/launch/proctree.py) ends a failed run with the failing worker's own error line
# and exit code.
exec "$PY" -m megatron_mhmoe.launch.proctree launch -- "$PY" -m torch.distributed.run --nproc_per_node "$NPROC" \
  --master_addr 127.0.0.1 --master_port "$PORT" -m megatron_mhmoe.train --config megatron_mhmoe/presets/quickstart.yaml "$@"
