#!/usr/bin/env bash
# Train on SEVERAL machines with the DeepSpeed launcher and a hostfile.
#
# Usage (pdsh, the default: run once, on node 0; needs passwordless ssh to every host and pdsh):
#   HOSTFILE=hosts MASTER_ADDR=10.0.0.1 MASTER_PORT=29600 launch/train_multi_node.sh --config my_run.yaml
# Usage (no ssh: run on EVERY node, each with its own NODE_RANK, 0 on the node that owns MASTER_ADDR):
#   NO_SSH=1 NODE_RANK=1 HOSTFILE=hosts MASTER_ADDR=10.0.0.1 launch/train_multi_node.sh --config my_run.yaml
# The arguments go unchanged to `python -m megatron_mhmoe.train` (--config FILE, --deepspeed_config FILE,
# --section.key=value overrides); the launcher adds --local_rank=N.
#
# Hostfile: one `HOSTNAME slots=N` line per node (N = ranks on it), `#` comments; host names of letters,
# digits, '.' and '-' only. With NO_SSH=1 the names need not resolve (they only order the nodes).
#
# Environment:
#   HOSTFILE         the hostfile (required)
#   MASTER_ADDR      address of node 0 that every node can reach, IPv4 or host name (required): pick the
#                    private/cluster interface, the rendezvous binds there
#   MASTER_PORT      rendezvous port, 1024-65535 (default 29500)
#   LAUNCHER         DeepSpeed multi-node backend: pdsh (default), mpich or impi (openmpi, mvapich and slurm
#                    are refused by launch_check: they do not give the program RANK/WORLD_SIZE or drop --module)
#   LAUNCHER_ARGS    extra arguments for that backend, one string (DeepSpeed --launcher_args)
#   NO_SSH=1         per-node mode (DeepSpeed --no_ssh): start this node's ranks only; needs NODE_RANK
#   NODE_RANK        this node's index in the hostfile order (NO_SSH=1 only)
#   NUM_NODES        use only the first NUM_NODES hosts (DeepSpeed --num_nodes)
#   GPUS_PER_NODE    use slots 0..GPUS_PER_NODE-1 of each host (DeepSpeed --num_gpus)
#   INCLUDE/EXCLUDE  DeepSpeed resource filter, e.g. INCLUDE='worker-0@worker-1:0,2' (not with NUM_NODES /
#                    GPUS_PER_NODE; INCLUDE and EXCLUDE are mutually exclusive)
#   SSH_PORT         ssh port of the hosts (pdsh)
#   OMP_NUM_THREADS  threads per rank on this node (default 1). pdsh starts remote ranks with a clean
#                    environment plus DeepSpeed's exports (PYTHON*, NCCL*, UCX*, MLFLOW*, MV2*) and the lines
#                    of ~/.deepspeed_env / ./.deepspeed_env: put OMP_NUM_THREADS=1, WANDB_* etc. there.
#   PYTHON           interpreter with deepspeed installed (default: <repo>/.venv/bin/python, else python3);
#                    pdsh runs the same path on every node, so the repo and venv must be at the same path
#   TRAIN_MODULE     module to launch (default megatron_mhmoe.train)
#   DRY_RUN=1        validate, print the launcher command, do not run it
#
# Everything is checked by `python -m megatron_mhmoe.launch.launch_check` first: the hostfile (a host name
# like `a;touch x` or `$(id)` is refused), filters, world size vs TP/EP, the run and DeepSpeed configs,
# MASTER_ADDR/MASTER_PORT, and for pdsh the arguments it passes through the remote shell. On any problem
# nothing is started and the exit code is 2.
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${HOSTFILE:-}" ]]; then
    echo "train_multi_node.sh: error: set HOSTFILE (lines 'HOSTNAME slots=N')" >&2; exit 2
fi
if [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "train_multi_node.sh: error: set MASTER_ADDR to node 0's address on the private network" >&2; exit 2
fi
MASTER_PORT="${MASTER_PORT:-29500}"
LAUNCHER="${LAUNCHER:-pdsh}"
TRAIN_MODULE="${TRAIN_MODULE:-megatron_mhmoe.train}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

check=(--hostfile "$HOSTFILE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --launcher "$LAUNCHER"
       --module "$TRAIN_MODULE")
ds=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --launcher "$LAUNCHER")
case "${NO_SSH:-0}" in
    0 | "") ;;
    1)
        if [[ -z "${NODE_RANK:-}" ]]; then
            echo "train_multi_node.sh: error: NO_SSH=1 needs NODE_RANK (0 on the node that owns MASTER_ADDR)" >&2
            exit 2
        fi
        check+=(--no-ssh --node-rank "$NODE_RANK"); ds+=(--no_ssh --node_rank "$NODE_RANK") ;;
    *) echo "train_multi_node.sh: error: NO_SSH must be 0 or 1, got '${NO_SSH}'" >&2; exit 2 ;;
esac
if [[ -n "${NUM_NODES:-}" ]]; then check+=(--nodes "$NUM_NODES"); ds+=(--num_nodes "$NUM_NODES"); fi
if [[ -n "${GPUS_PER_NODE:-}" ]]; then check+=(--gpus-per-node "$GPUS_PER_NODE"); ds+=(--num_gpus "$GPUS_PER_NODE"); fi
if [[ -n "${INCLUDE:-}" ]]; then check+=(--include "$INCLUDE"); ds+=(--include "$INCLUDE"); fi
if [[ -n "${EXCLUDE:-}" ]]; then check+=(--exclude "$EXCLUDE"); ds+=(--exclude "$EXCLUDE"); fi
if [[ -n "${SSH_PORT:-}" ]]; then check+=(--ssh-port "$SSH_PORT"); ds+=(--ssh_port "$SSH_PORT"); fi
if [[ -n "${LAUNCHER_ARGS:-}" ]]; then ds+=(--launcher_args "$LAUNCHER_ARGS"); fi

"$PYTHON" -m megatron_mhmoe.launch.launch_check "${check[@]}" -- "$@"

cmd=("$PYTHON" -u -m deepspeed.launcher.runner "${ds[@]}" --module "$TRAIN_MODULE" "$@")
if [[ "${DRY_RUN:-0}" == "1" ]]; then printf '%q ' "${cmd[@]}"; printf '\n'; exit 0; fi
# Through the wrapper: a busy MASTER_PORT is refused (exit 4) before anything starts, and a failed run ends
# with the failing worker's own error line and exit code instead of the launcher's traceback.
port_check=()
if [[ "${NO_SSH:-0}" != "1" || "${NODE_RANK:-}" == "0" ]]; then port_check=(--rendezvous "$MASTER_ADDR:$MASTER_PORT"); fi
cmd=("$PYTHON" -m megatron_mhmoe.launch.proctree launch ${port_check[@]+"${port_check[@]}"} -- "${cmd[@]}")
exec "${cmd[@]}"
