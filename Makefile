# The two commands: `make demo` and `make test`. Each creates .venv if needed and installs lab.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	rm -rf runs/demo
	$(PY) -m lab.run --config experiments/gpt_chars.py --workdir runs/demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -n auto -q

bench: $(VENV)/.installed-test
	$(PY) benchmarks/bench_gpt_cpu.py
