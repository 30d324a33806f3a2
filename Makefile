# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC picks the torch build: the default is the CPU wheel; on a CUDA machine use e.g.
#   make test TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
# CONSTRAINTS pins every other package to the versions the suite passed with (`make lock` refreshes
# it; CONSTRAINTS= installs the newest versions instead).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= faiss,eval,server,st,onnx,dev
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
LOCK_VENV := $(VENV)-lock

.PHONY: venv demo test test-fast lint format lock clean

# torch comes first; with another index (TORCH_INDEX) its own dependencies may not be there at the
# pinned versions, so they are pinned in the second step, which reinstalls any that differ.
$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),,$(PIP_CONSTRAINTS)) "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PY) -m pip install -q $(PIP_CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# Everything, the slow tests included (CI runs this).
test: $(STAMP)
	$(PY) -m pytest -q --durations=10 tests

# Leaves out the tests marked slow (training runs, subprocesses, the shipped model's evaluation).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Resolve the newest versions pyproject.toml allows in a scratch venv and pin them in CONSTRAINTS.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	{ echo "# Versions the test suite passed with: \`make venv\` installs with them; \`make lock\` refreshes them."; \
	  echo "# Resolved on Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version(), platform.system(), platform.machine())'). torch is pinned by the Makefile's TORCH_SPEC."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-)'; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(LOCK_VENV) build *.egg-info
