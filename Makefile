# Two commands do all set-up on a fresh machine: `make quickstart` and `make test`.
# Each creates (or reuses) a virtualenv in .venv and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/quickstart

.PHONY: quickstart test bench clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e .
	touch $@

# torch is only a reference for parity tests and benchmarks. Pin the CPU build:
# an unpinned torch pulls several GB of CUDA wheels.
$(VENV)/.test: $(VENV)/.core
	$(PY) -m pip install -q -e '.[test]' torch==2.13.0
	touch $@

quickstart: $(VENV)/.core
	$(VENV)/bin/jaxlm quickstart --workdir $(WORKDIR)

test: $(VENV)/.test
	$(PY) -m pytest -q

bench: $(VENV)/.test
	$(PY) scripts/bench_lm.py

clean:
	rm -rf $(VENV) runs
