# Two commands for a fresh machine (README): `make main` and `make test`. Both create/reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline

.PHONY: env main test bench clean-runs

env:
	@bash tools/setup_env.sh $(VENV)

main: env
	@PYTHON=$(PY) bash launch/quickstart.sh

test: env
	$(PY) -m pytest -q tests

bench: env
	$(PY) benchmarks/moe_layer.py

clean-runs:
	rm -rf runs
