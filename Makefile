# Two commands for a fresh machine (README): `make main` and `make test`. Both create/reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline

.PHONY: env main test test-fast bench clean-runs

env:
	@bash tools/setup_env.sh $(VENV)

main: env
	@PYTHON=$(PY) bash launch/quickstart.sh

test: env
	$(PY) -m pytest -q tests

# The marked subset (tests/conftest.py SLOW_FILES left out): under 3 minutes, every subpackage exercised.
test-fast: env
	$(PY) -m pytest -q -m "not slow" tests

bench: env
	$(PY) benchmarks/moe_layer.py

clean-runs:
	rm -rf runs
