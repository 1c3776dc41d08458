#!/usr/bin/env bash
# Train on ONE machine with the DeepSpeed launcher: GPUS ranks on this node.
#
# Usage:  launch/train_single_node.sh [TRAINING ARGS ...]
#   GPUS=8 MASTER_PORT=29600 launch/train_single_node.sh --config my_run.yaml \
#       --deepspeed_config ds_configs/zero2_bf16.json --train.zero_stage=2 --train.precision=bf16
# The arguments go unchanged to `python -m megatron_mhmoe.train` (--config FILE, --deepspeed_config FILE,
# --section.key=value overrides); the launcher adds --local_rank=N.
#
# Environment:
#   GPUS             ranks on this node (default: the GPUs `nvidia-smi -L` lists, else 1). Without GPUs
#                    DeepSpeed starts GPUS CPU ranks on gloo (launch/train_cpu.sh is the CPU script).
#   MASTER_PORT      rendezvous port, 1024-65535 (default 29500, DeepSpeed's fixed default: give every
#                    concurrent job on the machine its own port)
#   OMP_NUM_THREADS  CPU threads per rank (default 1; the deepspeed launcher does not set it)
#   PYTHON           interpreter with deepspeed installed (default: <repo>/.venv/bin/python, else python3)
#   TRAIN_MODULE     module to launch (default megatron_mhmoe.train)
#   DRY_RUN=1        validate, print the launcher command, do not run it
#
# Everything is checked by `python -m megatron_mhmoe.launch.launch_check` first (world size vs TP/EP, the
# run config, the DeepSpeed config, the port); on any problem nothing is started and the exit code is 2.
# Note: DeepSpeed's launcher reads /job/hostfile when it exists (its default hostfile); launch_check warns.
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${GPUS:-}" ]]; then
    GPUS="$( { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU ' || true)"
    if [[ "$GPUS" == "0" ]]; then GPUS=1; fi
fi
MASTER_PORT="${MASTER_PORT:-29500}"
TRAIN_MODULE="${TRAIN_MODULE:-megatron_mhmoe.train}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

"$PYTHON" -m megatron_mhmoe.launch.launch_check --launcher local --nodes 1 --gpus-per-node "$GPUS" \
    --master-addr 127.0.0.1 --master-port "$MASTER_PORT" --module "$TRAIN_MODULE" -- "$@"

cmd=("$PYTHON" -u -m deepspeed.launcher.runner --num_gpus "$GPUS" --master_port "$MASTER_PORT"
     --module "$TRAIN_MODULE" "$@")
if [[ "${DRY_RUN:-0}" == "1" ]]; then printf '%q ' "${cmd[@]}"; printf '\n'; exit 0; fi
# Through the wrapper: a busy MASTER_PORT is refused (exit 4) before anything starts, and a failed run ends
# with the failing worker's own error line and exit code instead of the launcher's traceback.
port_check=(--rendezvous "127.0.0.1:$MASTER_PORT")
cmd=("$PYTHON" -m megatron_mhmoe.launch.proctree launch ${port_check[@]+"${port_check[@]}"} -- "${cmd[@]}")
exec "${cmd[@]}"
