# Two entry points (see README): `make report` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REPORT_DIR ?= perf_reports
OUT ?= perf_reports

.PHONY: test report lint compile-check gpu-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[bench]"
	touch $@

test: $(VENV)/.installed-dev
	$(VENV)/bin/pytest -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

compile-check: $(VENV)/.installed-dev
	$(PY) -m dynconv.autotune compile-check

report: $(VENV)/.installed-bench
	$(PY) -m dynconv.autotune bench --preset quick --device cpu --out $(REPORT_DIR)
	$(PY) -m dynconv.autotune report $(REPORT_DIR)/cpu

# On a GPU machine with torch + triton installed and no network: GPU tests, a short sweep, the bench.
gpu-check:
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e . \
		|| echo "gpu-check: could not (re)install dynconv; using the installed copy, if any"
	$(PYTHON) -m dynconv.autotune gpu-check --out $(OUT)

clean:
	rm -rf $(VENV) build *.egg-info
