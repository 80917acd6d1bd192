# titan: `make train` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install train test test-fast lint format clean gpu-wheels

install: $(STAMP)

# Where torch is already installed (a GPU image) the venv sees it and keeps it; otherwise the
# CPU build torch==2.13.0 is installed first so that the project's `torch>=2.11,<2.14` keeps it.
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "keeping the installed torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	@touch $(STAMP)

train: $(STAMP)
	$(PY) launch.py $(ARGS)

# The Slurm tests run against a real two-node cluster on this machine (../shared/slurm, as root), brought
# up for them and torn down afterwards, also when tests fail; without it they skip. 8 CPUs advertised per
# node let their jobs run side by side.
SLURM_SCRIPTS := $(CURDIR)/../shared/slurm
export SLURM_CI_CPUS ?= 8

test: $(STAMP)
	@if [ -f "$(SLURM_SCRIPTS)/slurm-up.sh" ] && [ "$$(id -u)" = 0 ]; then \
	  trap 'bash "$(SLURM_SCRIPTS)/slurm-down.sh"' EXIT; \
	  bash "$(SLURM_SCRIPTS)/slurm-up.sh" || exit 1; \
	  export SLURM_CONF="$${SLURM_CI_DIR:-/tmp/slurm-ci}/etc/slurm.conf"; \
	else echo "no $(SLURM_SCRIPTS)/slurm-up.sh (or not root): Slurm tests skip unless Slurm is up"; fi; \
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/lint-imports --no-logo
	$(PY) -m ruff check titan tests launch.py benchmarks hydra_plugins
	$(PY) -m ruff format --check titan tests launch.py benchmarks hydra_plugins

format: $(STAMP)
	$(PY) -m ruff check --fix titan tests launch.py benchmarks hydra_plugins
	$(PY) -m ruff format titan tests launch.py benchmarks hydra_plugins

# The wheels benchmarks/gpu_check.sh installs offline (`--no-index`) on the GPU image, which lacks them
# (../shared/PLATFORM.md): ../shared/gpu-wheels/ (built for its Python 3.12), the Python 3.11 build of
# any of those that is py3.12-only (for the CPU rehearsal here), and liger-kernel (pure Python).
gpu-wheels:
	mkdir -p gpu-wheels
	cp -f ../shared/gpu-wheels/*.whl gpu-wheels/
	@for wheel in gpu-wheels/*-py312-none-any.whl; do \
	  [ -e "$$wheel" ] || continue; \
	  name=$$(basename "$$wheel" | cut -d- -f1); version=$$(basename "$$wheel" | cut -d- -f2); \
	  echo "$$name==$$version for Python 3.11"; \
	  $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 -d gpu-wheels "$$name==$$version" || exit 1; \
	done
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d gpu-wheels liger-kernel
	@ls gpu-wheels

clean:
	rm -rf runs outputs multirun .pytest_cache
