# The commands a data engineer runs. The first `make test` or `make demo`
# installs everything into this folder (.venv, .cache); later runs reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install services services-stop test lint format demo bench clean

$(VENV)/.installed: pyproject.toml setup.py dataflow/_speedups.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@$(PY) -c 'import dataflow._speedups' 2>/dev/null || echo "WARNING: dataflow/_speedups.c did not build" \
	  "(needs a C compiler and the Python headers, e.g. gcc and python3-dev): the pipeline runs, slower," \
	  "and make test fails on test_the_extension_is_built. Install them, then: touch setup.py && make install" >&2
	touch $@

## install: Python packages, Kafka jars (Maven), MinIO (go install), promtool (apt), and the
## offline manifest validators (kubeconform + schemas, docker compose), all cached
install: $(VENV)/.installed
	$(PY) -m services install
	bash .ci/install-promtool
	bash .ci/install-kubeconform >/dev/null

## services: start Kafka and MinIO in the background; writes .services.env
services: install
	$(PY) -m services start

## services-stop: stop them (their data stays under .cache/run)
services-stop:
	$(PY) -m services stop

## test: lint, then every test; the fixtures start Kafka and MinIO themselves
test: install lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## demo: run the pipeline on its bundled sample (no services needed) into ./data, then show what it wrote
demo: $(VENV)/.installed
	@export CDC_KAFKA_BROKERS= CDC_LAKE_URI=./data/lake CDC_DLQ_FALLBACK=./data/dlq/fallback.jsonl \
	  CDC_LOG_LEVEL=ERROR CDC_LOG_FORMAT=text; \
	  $(PY) -m bytewax.run dataflow.main:flow && \
	  $(PY) -m dataflow.cli status && echo && \
	  $(PY) -m dataflow.cli dlq inspect --fallback 2>/dev/null

EVENTS ?= 1000000
BENCH_ARGS ?=
# The table-size run after it: tables of each TABLE_SWEEP size (and TABLE_DOCS), TABLE_UPDATES changes
# each; TABLE_SIZE=0 skips it.
TABLE_SIZE ?= 1
TABLE_DOCS ?= 5000000
TABLE_UPDATES ?= 1000000
TABLE_SWEEP ?= 250000,1000000,5000000
TABLE_SIZE_ARGS ?=
# With it, one MERGE's memory by how its source reaches delta-rs (bench/merge_source.py); MERGE_SOURCE=0
# skips it.
MERGE_SOURCE ?= 1
# Then table maintenance (bench/maintenance.py): MAINTENANCE_EVENTS append events, files and read times
# before and after maintain_lake; MAINTENANCE=0 skips it.
MAINTENANCE ?= 1
MAINTENANCE_EVENTS ?= 1000000
MAINTENANCE_ARGS ?=

## bench: floor vs hand-written baseline vs this pipeline, and latency; EVENTS=..., BENCH_ARGS=...;
## then merge mode against the table size (bench/table_size.py); TABLE_DOCS, TABLE_UPDATES, TABLE_SWEEP;
## and one MERGE's memory by its source (bench/merge_source.py); MERGE_SOURCE=0 skips it;
## then table maintenance (bench/maintenance.py); MAINTENANCE_EVENTS
bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench --events $(EVENTS) $(BENCH_ARGS)
	@if [ "$(TABLE_SIZE)" != 0 ]; then \
	  $(PY) -m bench.table_size --docs $(TABLE_DOCS) --updates $(TABLE_UPDATES) --sweep $(TABLE_SWEEP) \
	    $(TABLE_SIZE_ARGS); fi
	@if [ "$(TABLE_SIZE)" != 0 ] && [ "$(MERGE_SOURCE)" != 0 ]; then \
	  $(PY) -m bench.merge_source --updates 1130000; fi
	@if [ "$(MAINTENANCE)" != 0 ]; then \
	  $(PY) -m bench.maintenance --events $(MAINTENANCE_EVENTS) $(MAINTENANCE_ARGS); fi

clean:
	rm -rf data .pytest_cache .ruff_cache
