# captune: `make demo` and `make test` work on a fresh clone (they create .venv when missing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch must go in first: an unpinned torch requirement would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install install-test demo test mutants clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/captune demo --output runs/demo

test: install-test
	$(PY) -m pytest -q

# Not part of `test`: breaks one feature at a time in a temporary copy and reruns its tests (tools/mutants.py).
mutants: install-test
	$(PY) tools/mutants.py

clean:
	rm -rf $(VENV) runs .pytest_cache
