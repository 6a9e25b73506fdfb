# Everything starts from a machine with only Python: each target creates .venv if missing.
# Installs come from requirements.lock (every version pinned, Linux x86_64, CPython 3.11), so this
# machine, CI and every node of a Ray cluster (cluster.yaml) run identical versions.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
UV_VERSION := 0.13.9

.PHONY: install lock demo test test-slow bench gpu-wheels lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The lock's versions, nothing resolved at install time (--no-deps), then spntune itself (editable).
# Bytecode: pip's compile step is off (--no-compile); compileall writes every module's .pyc once, on
# every core. Python would write them on first import by itself, except where PYTHONDONTWRITEBYTECODE=1
# (many container and CI images, and this project's build machine): there every process, each Ray trial
# worker included, compiled torch, Ray and MLflow from source again, 10-15 s of CPU per process on 2 cores
# (`import ray` 7.0 -> 2.3 s, `import mlflow` 7.7 -> 2.9 s, a two-trial smoke search 67 -> 47 s). Python
# reads .pyc files whatever that variable says. A few files in site-packages are templates, not Python,
# and make compileall exit 1: hence -qq (silent) and || true (the bytecode only saves time).
$(STAMP): $(BIN)/python $(LOCK) pyproject.toml
	@$(BIN)/python -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "$(LOCK) is for CPython 3.11; this venv has Python %d.%d: make PYTHON=python3.11 (after rm -rf $(VENV))" % sys.version_info[:2])'
	$(BIN)/python -m pip install -q --no-deps --no-compile -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	$(BIN)/python -m compileall -qq -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" src || true
	touch $(STAMP)

install: $(STAMP)

# Regenerate the lock from pyproject.toml's ranges (+ the dev extra). Versions already in the lock are
# kept unless they no longer fit; `make lock UPGRADE=1` moves everything to the newest releases.
lock: $(BIN)/python
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 $(if $(UPGRADE),--upgrade) -o $(LOCK)

# A small search (6 trials) on the built-in synthetic data with Ray on this machine.
demo: $(STAMP)
	rm -rf runs/ray/demo
	$(BIN)/spntune search --space smoke --trials 6 --concurrency 2 --name demo --storage runs/ray

# tests/run.py: pytest, then os._exit with its status (skips interpreter teardown: once the process crashed
# there after all tests passed, likely under the threads Ray leaves behind after each in-process ray.shutdown).
test: $(STAMP)
	$(BIN)/python tests/run.py -q --durations=12

test-slow: $(STAMP)
	$(BIN)/python tests/run.py -q -m slow --durations=12

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# For a session lent a GPU: the wheels benchmarks/gpu_check.sh installs on the device, whose Python 3.12 image
# holds torch and triton but not segmentation-models-pytorch (pure Python; its own needs are all there).
gpu-wheels: $(STAMP)
	rm -rf .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
	    $$(grep -m1 '^segmentation-models-pytorch==' $(LOCK))

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf runs mlflow_runs .pytest_cache
