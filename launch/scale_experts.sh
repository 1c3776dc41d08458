#!/usr/bin/env bash
# Expert-scaling sweep on SEVERAL machines: one DeepSpeed multi-node launch per run, one line per run out.
#
# Usage (run on node 0; pdsh + passwordless ssh to every host, the repo and venv at the same path everywhere):
#   HOSTFILE=hosts MASTER_ADDR=10.0.0.1 launch/scale_experts.sh --preset paper_scaling [--out DIR] [overrides]
#   DRY_RUN=1 HOSTFILE=hosts launch/scale_experts.sh --preset paper_scaling      (or --dry-run)
# The dry run prints the plan (runs, nodes, EP sizes, experts per rank, memory estimate per rank) and the
# launch line of every run, writes the run configs, and starts nothing.
#
# Each run gets NUM_NODES = the nodes its experts need (plan.py: experts per rank fixed, EP grows with E,
# nodes taken in hostfile order) and goes through launch/train_multi_node.sh, which validates it again.
# Rerunning the same command skips runs already in <out>/results.jsonl and resumes unfinished ones.
#
# Environment:
#   HOSTFILE      DeepSpeed hostfile, one `HOSTNAME slots=N` line per node, equal N (required)
#   MASTER_ADDR   node 0's address on the private network (required unless DRY_RUN=1)
#   MASTER_PORT   rendezvous port (default 29500)
#   LAUNCHER      DeepSpeed backend: pdsh (default), mpich or impi
#   PYTHON        interpreter (default <repo>/.venv/bin/python, else python3)
#   DRY_RUN=1     plan only
# Arguments: --preset NAME|FILE (required), --out DIR, --only REGEX, --dry-run, and overrides
# --sweep.key=value / --base.section.key=value (e.g. --base.data.data_path=[/data/pile_text_document]).
#
# The hostfile is checked first by `python -m megatron_mhmoe.launch.launch_check` (names, slots, address,
# port; a host name like `a;touch x` is refused); on any problem nothing starts and the exit code is 2.
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

dry="${DRY_RUN:-0}"
args=()
for a in "$@"; do
    if [[ "$a" == "--dry-run" ]]; then dry=1; else args+=("$a"); fi
done
case "$dry" in 0|1) ;; *) echo "scale_experts.sh: error: DRY_RUN must be 0 or 1, got '$dry'" >&2; exit 2 ;; esac
if [[ -z "${HOSTFILE:-}" ]]; then
    echo "scale_experts.sh: error: set HOSTFILE (lines 'HOSTNAME slots=N')" >&2; exit 2
fi
if [[ -z "${MASTER_ADDR:-}" ]]; then
    if [[ "$dry" == "1" ]]; then MASTER_ADDR=127.0.0.1
    else echo "scale_experts.sh: error: set MASTER_ADDR to node 0's address on the private network" >&2; exit 2; fi
fi
MASTER_PORT="${MASTER_PORT:-29500}"
LAUNCHER="${LAUNCHER:-pdsh}"

# 1. The hostfile, address and port, through the same parser every launch script uses (EP 1: any world fits).
"$PYTHON" -m megatron_mhmoe.launch.launch_check --hostfile "$HOSTFILE" --master-addr "$MASTER_ADDR" \
    --master-port "$MASTER_PORT" --launcher "$LAUNCHER" -- --parallel.tp=1 --parallel.ep=1 >/dev/null

# 2. The sweep: plan, then one launch per run (or the launch lines).
cmd=("$PYTHON" "$ROOT/tools/scaling.py" launch --hostfile "$HOSTFILE" --master-addr "$MASTER_ADDR"
     --master-port "$MASTER_PORT" --launcher "$LAUNCHER")
if [[ "$dry" == "1" ]]; then cmd+=(--dry-run); fi
exec "${cmd[@]}" ${args[@]+"${args[@]}"}
