# eblvm: `make train` trains the default model, `make test` runs the tests. Both set up .venv first if needed.
# VENV can point elsewhere (CI keeps one venv across clones): make test VENV=~/.cache/eblvm/venv
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# Reinstall only when pyproject.toml changes or the checkout moves.
STAMP := $(VENV)/.eblvm-$(shell cat pyproject.toml | sha1sum | cut -c1-10)-$(shell pwd | sha1sum | cut -c1-10)
TORCH := torch==2.14.1 torchvision==0.29.1
ARGS ?=

.PHONY: install train test test-fast lint format bench checkerboard nk-study clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -e ".[dev]"
	@rm -f $(VENV)/.eblvm-* && touch $@

train: install  ## the default run (GRBM 2->4, BiDSM, checkerboard); extra overrides: make train ARGS="seed=2"
	$(PYTHON) train.py $(ARGS)

# The tests run in one process per core, each with one thread (small tensors: threads only contend).
PYTEST := OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n $(shell nproc) --dist load

test: install  ## every test, the slow end-to-end ones included
	$(PYTEST)

test-fast: install  ## skip the tests marked slow
	$(PYTEST) -m "not slow"

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: install
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

bench: install  ## speed and memory of a training iteration on this machine
	$(PYTHON) benchmarks/bench_iteration.py

checkerboard: install  ## the BiSM checkerboard study; SETTING=quick|default|paper
	$(PYTHON) experiments/checkerboard/study.py --setting $(or $(SETTING),default)

nk-study: install  ## BiDSM over n_lower_steps x n_unroll and its gradient bias; SETTING=quick|short|default
	$(PYTHON) experiments/nk_study/study.py --setting $(or $(SETTING),default) --jobs $(or $(JOBS),2)

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
