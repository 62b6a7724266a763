# Quick start: `make demo` (set up, then run the end-to-end demo on the embedded model) and
# `make test` (set up, then run the test suite). Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	ONSFT_VENV=$(VENV) bash scripts/setup.sh
	touch $@

demo: setup
	$(VENV)/bin/onsft demo --out runs/demo

test: setup
	$(PY) -m pytest -n 2 --durations=15 tests

# Style never drifts: CI runs this before the tests (`ruff format` rewrites, `--check` only reports).
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: setup
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/audit.py
	$(PY) benchmarks/hinted.py
	$(PY) benchmarks/skewed.py
	$(PY) benchmarks/hinted.py --breakdown
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) runs .pytest_cache
