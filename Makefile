# Two commands matter to a newcomer: `make demo` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint format demo chaos bench-engine bench-overhead bench-faults bench-scale bench-versus profile-overhead dashboards sbom clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ needed"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Everything: unit, integration and system tests (Postgres is embedded unless
# AFFINITY_TEST_DSN names one).
test: $(STAMP)
	$(PY) -m pytest -q

# The domain on the memory store: no Postgres, no sockets, a few seconds.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m unit

lint: $(STAMP)
	$(VENV)/bin/ruff check affinity_node tests
	$(VENV)/bin/ruff format --check affinity_node tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix affinity_node tests
	$(VENV)/bin/ruff format affinity_node tests

demo: $(STAMP)
	$(VENV)/bin/affinity-node demo $(DEMO_ARGS)

# The fault-schedule soak; CHAOS_ARGS="--duration 600" for a longer run.
chaos: $(STAMP)
	$(VENV)/bin/affinity-node chaos $(CHAOS_ARGS)

bench-engine: $(STAMP)
	$(PY) -m affinity_node.devtools.bench_engine

bench-overhead: $(STAMP)
	$(PY) -m affinity_node.devtools.bench_overhead

bench-faults: $(STAMP)
	$(PY) -m affinity_node.devtools.bench_faults

# A million bindings (and a hundred thousand, side by side): start, RSS, resync, NOTIFY lag.
# Takes a few minutes; SCALE_ARGS="--bindings 200000" for a quicker run.
bench-scale: $(STAMP)
	$(PY) -m affinity_node.devtools.bench_scale $(SCALE_ARGS)

# This node side by side with the bare forwarder on one core, or with another revision:
# VERSUS_ARGS="--against 78bc859 --sizes tiny,8k,200k".
bench-versus: $(STAMP)
	$(PY) -m affinity_node.devtools.bench_versus $(VERSUS_ARGS)

# A py-spy profile of the node under the overhead benchmark's load; PROFILE_ARGS="--size 200k".
profile-overhead: $(STAMP)
	$(PY) -m affinity_node.devtools.profile_overhead $(PROFILE_ARGS)

dashboards: $(STAMP)
	$(PY) -m affinity_node.devtools.dashboards

# A CycloneDX SBOM of the image's Python packages, from the lock the image installs
# (deploy/requirements.lock); tests/system/test_sbom.py checks it against the lock and pip.
SBOM ?= build/sbom.cdx.json
sbom: $(STAMP)
	@mkdir -p $(dir $(SBOM))
	$(VENV)/bin/cyclonedx-py requirements --pyproject pyproject.toml --of JSON \
		--output-reproducible --validate -o $(SBOM) deploy/requirements.lock

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
