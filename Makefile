# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv if it is missing, installs the package (editable) and then runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install --quiet --upgrade pip
	@# Prefer a torch wheel already on this machine (CPU build) over a multi-GB CUDA download.
	@$(PY) -c "import torch" 2>/dev/null || { \
	  wheel=$$(ls /opt/wheels/torch-*cpu*.whl 2>/dev/null | sort -V | tail -n 1); \
	  if [ -n "$$wheel" ]; then $(PIP) install --quiet "$$wheel"; \
	  else $(PIP) install --quiet "torch>=2.4"; fi; }
	$(PIP) install --quiet -e ".[test]"
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: venv
	$(VENV)/bin/bluesky-ptychopinn demo

test: venv
	$(VENV)/bin/ruff check bluesky_ptychopinn tests bench
	@# Two workers, one test file each at a time (module-scoped servers stay in one process):
	@# most of the suite waits on servers, subprocesses and timeouts, so 2 cores halve it.
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=30 tests
	$(PY) -m pytest -q -p no:cacheprovider --doctest-modules bluesky_ptychopinn

lint: venv
	$(VENV)/bin/ruff check bluesky_ptychopinn tests bench

# pty-chi needs torchvision, whose wheels match only their own torch build: it lives in a
# separate environment and exchanges NPZ files with the benchmarks (bench/_ptychi_runner.py).
.venv-bench/.installed:
	@test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" "ptychi==2.2.0"
	@touch $@

bench: venv .venv-bench/.installed
	$(PY) bench/core.py
	$(PY) bench/inference.py
	$(PY) bench/live.py
	$(PY) bench/report.py

clean:
	rm -rf $(VENV) .venv-bench build *.egg-info
