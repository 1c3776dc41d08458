#!/usr/bin/env bash
# Train with torchrun on GPU nodes: run this script once on EVERY node.
#
# Usage:
#   one node:   NPROC_PER_NODE=8 launch/train_torchrun.sh --config my_run.yaml
#   two nodes:  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/train_torchrun.sh --config my_run.yaml  (node 0)
#               NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/train_torchrun.sh --config my_run.yaml  (node 1)
#   elastic rendezvous: add RDZV_BACKEND=c10d RDZV_ID=<job id> on every node (ranks of nodes are then assigned
#               by the rendezvous; NODE_RANK is only checked, not passed)
#   under slurm: srun --ntasks-per-node=1 env NNODES=$SLURM_NNODES NODE_RANK=$SLURM_NODEID MASTER_ADDR=... \
#               launch/train_torchrun.sh ...
# The arguments go unchanged to `python -m megatron_mhmoe.train` (--config FILE, --deepspeed_config FILE,
# --section.key=value overrides). torchrun gives each rank RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT.
#
# Environment:
#   NNODES           number of nodes (default 1)
#   NODE_RANK        this node's rank, 0..NNODES-1 (default 0)
#   NPROC_PER_NODE   ranks per node (default: the GPUs `nvidia-smi -L` lists, else 1)
#   MASTER_ADDR      node 0's address that every node can reach, IPv4 or host name (default 127.0.0.1 for one
#                    node; required for several: pick the private/cluster interface)
#   MASTER_PORT      rendezvous port, 1024-65535 (default 29500)
#   RDZV_BACKEND     static (default: fixed node ranks, MASTER_ADDR:MASTER_PORT) or c10d
#   RDZV_ID          rendezvous id for c10d (default megatron_mhmoe): the same on every node of a job
#   MAX_RESTARTS     torchrun restarts of the worker group on failure (default 0)
#   OMP_NUM_THREADS  threads per rank (torchrun sets 1 when unset)
#   PYTHON           interpreter with torch installed (default: <repo>/.venv/bin/python, else python3)
#   TRAIN_MODULE     module to launch (default megatron_mhmoe.train)
#   DRY_RUN=1        validate, print the launcher command, do not run it
#
# Everything is checked by `python -m megatron_mhmoe.launch.launch_check` first (world size vs TP/EP, the
# run and DeepSpeed configs, MASTER_ADDR/MASTER_PORT, NODE_RANK); on any problem nothing is started and
# the exit code is 2.
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$( { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU ' || true)"
    if [[ "$NPROC_PER_NODE" == "0" ]]; then NPROC_PER_NODE=1; fi
fi
if [[ -z "${MASTER_ADDR:-}" ]]; then
    if [[ "$NNODES" != "1" ]]; then
        echo "train_torchrun.sh: error: NNODES=$NNODES needs MASTER_ADDR (node 0's private address)" >&2; exit 2
    fi
    MASTER_ADDR=127.0.0.1
fi
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_BACKEND="${RDZV_BACKEND:-static}"
RDZV_ID="${RDZV_ID:-megatron_mhmoe}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
TRAIN_MODULE="${TRAIN_MODULE:-megatron_mhmoe.train}"

"$PYTHON" -m megatron_mhmoe.launch.launch_check --launcher torchrun --nodes "$NNODES" \
    --gpus-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" \
    --master-port "$MASTER_PORT" --rdzv-backend "$RDZV_BACKEND" --rdzv-id "$RDZV_ID" \
    --max-restarts "$MAX_RESTARTS" --module "$TRAIN_MODULE" -- "$@"

if [[ "$RDZV_BACKEND" == "c10d" ]]; then
    rdzv=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID")
else
    rdzv=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
fi
cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${rdzv[@]}"
     --max_restarts "$MAX_RESTARTS" -m "$TRAIN_MODULE" "$@")
if [[ "${DRY_RUN:-0}" == "1" ]]; then printf '%q ' "${cmd[@]}"; printf '\n'; exit 0; fi
# Through the wrapper: a busy MASTER_PORT is refused (exit 4) before anything starts, and a failed run ends
# with the failing worker's own error line and exit code instead of the launcher's traceback.
port_check=()
if [[ "$RDZV_BACKEND" == "static" && "$NODE_RANK" == "0" ]]; then port_check=(--rendezvous "$MASTER_ADDR:$MASTER_PORT"); fi
cmd=("$PYTHON" -m megatron_mhmoe.launch.proctree launch ${port_check[@]+"${port_check[@]}"} -- "${cmd[@]}")
exec "${cmd[@]}"
