#!/usr/bin/env bash
# The prepared one-GPU check (one command, under 8 minutes on one H100/H200 once the venv exists):
#   bash benchmarks/gpu_check.sh [--out DIR] [--budget-s S]      one CUDA GPU; refused at once without one
#   bash benchmarks/gpu_check.sh --cpu-smoke                     same checks on the CPU, tiny sizes
# Prints `CHECK <name> PASS|FAIL <figures>` per check, then `GPU CHECK: N passed, M failed`; exit 0 only if
# all passed (1: some failed, 2: refused). Everything printed is also in <run folder>/gpu_check.log.
# The checks themselves are in benchmarks/gpu_check.py.
#
# Environment: GPU_CHECK_VENV (default .venv), built or reused by tools/setup_env.sh;
#   GPU_CHECK_PYTHON=<interpreter> uses that one instead and builds nothing;
#   GPU_CHECK_SETUP_TIMEOUT_S (default 1200) bounds the venv build (pip downloads: not in the 8 minutes);
#   GPU_CHECK_WHEELS (default .whl when that folder exists): a machine without network that already has CUDA
#   torch: the wheels there (made by benchmarks/gpu_wheels.sh: deepspeed, pydantic, ...) are installed into a
#   temporary folder with no index and the machine's own python3 runs the checks.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
out=""
prev=""
for a in "$@"; do
  case "$a" in
    --cpu-smoke) smoke=1 ;;
    --out=*) out="${a#--out=}" ;;
  esac
  if [ "$prev" = "--out" ]; then out="$a"; fi
  prev="$a"
done

# Refuse before any venv work: a machine without a GPU would otherwise spend minutes installing first.
if [ "$smoke" = 0 ]; then
  cvd="${CUDA_VISIBLE_DEVICES-unset}"
  if [ "$cvd" = "" ] || [ "$cvd" = "-1" ]; then
    echo "gpu_check: CUDA_VISIBLE_DEVICES='$cvd' hides every GPU: this check needs one CUDA GPU (--cpu-smoke tests the script on CPU)" >&2
    exit 2
  fi
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "gpu_check: no NVIDIA GPU found (nvidia-smi -L lists none): this check needs one CUDA GPU (--cpu-smoke tests the script on CPU)" >&2
    exit 2
  fi
fi

if [ -z "$out" ]; then
  out="runs/gpu_check/$(date +%Y%m%d-%H%M%S)"
  if [ "$smoke" = 1 ]; then out="$out-cpu-smoke"; fi
  set -- "$@" --out "$out"
fi
mkdir -p "$out"
log="$out/gpu_check.log"
say() { echo "$*" | tee -a "$log"; }

setup() {  # $1 venv; output into the log; fails on timeout
  local t=${GPU_CHECK_SETUP_TIMEOUT_S:-1200}
  say "[gpu_check] environment: bash tools/setup_env.sh $1 (timeout ${t} s)"
  timeout "$t" bash tools/setup_env.sh "$1" 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

t0=$(date +%s)
wheels="${GPU_CHECK_WHEELS:-}"
if [ -z "$wheels" ] && [ -z "${GPU_CHECK_PYTHON:-}" ] && [ "$smoke" = 0 ] && [ -d .whl ]; then wheels=.whl; fi
if [ -n "$wheels" ]; then
  site="$(mktemp -d /tmp/gpu_check_site.XXXXXX)"
  say "[gpu_check] environment: python3 + wheels from $wheels into $site (no index)"
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl \
      2>&1 | tee -a "$log"; then
    exec python3 benchmarks/gpu_check.py "$@" --setup-failed "pip install of $wheels/*.whl failed"
  fi
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  GPU_CHECK_PYTHON=python3
fi
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  py="$GPU_CHECK_PYTHON"
  say "[gpu_check] environment: GPU_CHECK_PYTHON=$py (no venv setup)"
else
  venv="${GPU_CHECK_VENV:-.venv}"
  setup "$venv"; rc=$?
  if [ "$rc" = 0 ]; then ok=1; else ok=0; fi
  if [ "$ok" = 1 ] && [ "$smoke" = 0 ] \
      && ! "$venv/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    # A venv built where there was no GPU keeps its CPU torch (setup_env.sh's stamp says it is complete).
    say "[gpu_check] torch in $venv is a CPU build: using a separate .venv-cuda with the CUDA torch"
    venv=".venv-cuda"
    MHMOE_FORCE_GPU=1 setup "$venv"; rc=$?
    if [ "$rc" = 0 ]; then ok=1; else ok=0; fi
  fi
  py="$venv/bin/python"
  if [ "$ok" = 0 ]; then
    why="$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-300)"
    say "[gpu_check] environment setup failed after $(( $(date +%s) - t0 )) s"
    runner="python3"; if [ -x "$py" ]; then runner="$py"; fi
    if [ "$rc" = 124 ]; then why="timed out after ${GPU_CHECK_SETUP_TIMEOUT_S:-1200} s; last line: $why"
    else why="exit $rc; last line: $why"; fi
    exec "$runner" benchmarks/gpu_check.py "$@" --setup-failed "tools/setup_env.sh $venv: $why"
  fi
fi
say "[gpu_check] environment ready in $(( $(date +%s) - t0 )) s"
exec "$py" benchmarks/gpu_check.py "$@"
