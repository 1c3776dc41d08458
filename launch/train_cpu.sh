#!/usr/bin/env bash
# Train on THIS machine's CPU: NPROC processes on gloo, started by torchrun.
#
# Usage:  launch/train_cpu.sh [TRAINING ARGS ...]
#   NPROC=4 MASTER_PORT=29610 launch/train_cpu.sh --train.train_steps=50 --parallel.ep=4
# The arguments go unchanged to `python -m megatron_mhmoe.train` (--config FILE, --deepspeed_config FILE,
# --section.key=value overrides).
#
# Environment:
#   NPROC            number of processes (default 2)
#   MASTER_PORT      rendezvous port on 127.0.0.1, 1024-65535 (default 29500: give every concurrent job
#                    on the machine its own port)
#   OMP_NUM_THREADS  threads per process (default 1)
#   DS_ACCELERATOR   DeepSpeed accelerator (default cpu; communication backend gloo)
#   WANDB_MODE       wandb mode (default offline: writes the run under the run directory, no network)
#   PYTHON           interpreter (default: <repo>/.venv/bin/python, else python3)
#   TRAIN_MODULE     module to launch (default megatron_mhmoe.train)
#   DRY_RUN=1        validate, print the launcher command, do not run it
# CUDA_VISIBLE_DEVICES is set empty: this script trains on the CPU even on a machine with GPUs.
#
# Everything is checked by `python -m megatron_mhmoe.launch.launch_check` first (world size vs TP/EP, the
# run config, the DeepSpeed config, the port); on any problem nothing is started and the exit code is 2.
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
NPROC="${NPROC:-2}"
MASTER_PORT="${MASTER_PORT:-29500}"
TRAIN_MODULE="${TRAIN_MODULE:-megatron_mhmoe.train}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export WANDB_MODE="${WANDB_MODE:-offline}"
export CUDA_VISIBLE_DEVICES=""

"$PYTHON" -m megatron_mhmoe.launch.launch_check --launcher torchrun --nodes 1 --gpus-per-node "$NPROC" \
    --master-addr 127.0.0.1 --master-port "$MASTER_PORT" --module "$TRAIN_MODULE" -- "$@"

cmd=("$PYTHON" -m torch.distributed.run --nnodes 1 --nproc_per_node "$NPROC" --master_addr 127.0.0.1
     --master_port "$MASTER_PORT" -m "$TRAIN_MODULE" "$@")
if [[ "${DRY_RUN:-0}" == "1" ]]; then printf '%q ' "${cmd[@]}"; printf '\n'; exit 0; fi
# Through the wrapper: a busy MASTER_PORT is refused (exit 4) before anything starts, and a failed run ends
# with the failing worker's own error line and exit code instead of the launcher's traceback.
port_check=(--rendezvous "127.0.0.1:$MASTER_PORT")
cmd=("$PYTHON" -m megatron_mhmoe.launch.proctree launch ${port_check[@]+"${port_check[@]}"} -- "${cmd[@]}")
exec "${cmd[@]}"
