# squish — the two commands of the Quick start are `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES := 1

.PHONY: install run test test-fast lint bench clean

install: $(STAMP)

# torch goes in first, from the CPU wheel, so that nothing later pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[server,engine,dev]'
	@if $(BIN)/pip list 2>/dev/null | grep -qi '^nvidia-'; then echo "nvidia-* packages were pulled in; refusing" >&2; exit 1; fi
	@$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 'wrong torch ' + torch.__version__)"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/squish serve

# Two pytest workers (one per core; engine tests run torch on one thread each); the tests
# that share Redis and real worker processes stay on one of them (tests/conftest.py).
TEST_WORKERS ?= 2

# The dashboard's browser tests drive Debian's chromium: installed here when missing (as root).
test: $(STAMP)
	scripts/ensure-chromium
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup --durations=20 $(PYTEST_ARGS)

# The quick loop: no real worker processes, no external services.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup -m "not slow and not services" -x $(PYTEST_ARGS)

lint: $(STAMP)
	scripts/check-large-files
	$(BIN)/lint-imports
	$(BIN)/ruff check app worker squish tests benchmarks migrations
	$(BIN)/ruff format --check app worker squish tests benchmarks migrations
	$(BIN)/mypy

# wrk (Debian's package) drives the GET load test; without it a Python load generator is used.
bench: $(STAMP)
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq wrk >/dev/null; } || \
		echo "wrk not installed: the GET benchmark uses its Python load generator" >&2
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .squish
