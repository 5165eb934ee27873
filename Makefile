# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
# `make demo` pretrains a small Llama on this machine's Python sources (configs/demo.py).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Simulated devices for CPU runs; harmless on TPU and GPU, where the host platform is unused.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
# The tests and the demo run on the CPU (libtpu, installed for ahead-of-time TPU compiles,
# would otherwise look for a TPU first).
export JAX_PLATFORMS ?= cpu

.PHONY: install test test-fast lint demo clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Tests run on PYTEST_WORKERS processes (pytest-xdist); 2 suits a 2-core machine.
PYTEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)

# The inner loop: everything but the tests marked slow (4.2 minutes on 2 cores, 678 tests).
test-fast: install
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -m "not slow"

STDLIB = $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')

demo: install runs/tokenizer/demo.model
	$(BIN)/llamax-train --config configs/demo.py --workdir runs/demo

runs/tokenizer/demo.model: | install
	$(BIN)/llamax-tokenizer train --input '$(STDLIB)/*.py' --vocab-size 2048 --output $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs
