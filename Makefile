# Two commands matter to a newcomer: `make demo` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench-engine bench-overhead lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ needed"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/affinity-node demo $(DEMO_ARGS)

bench-engine: $(STAMP)
	$(PY) -m affinity_node.devtools.bench_engine

bench-overhead: $(STAMP)
	$(PY) -m affinity_node.devtools.bench_overhead

lint: $(STAMP)
	$(VENV)/bin/ruff check affinity_node tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
