# The two commands (README): `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/loadcast demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Debian packages the tests use: haproxy (sidecar data plane), wrk (proxy benchmark),
# chromium and chromium-driver (the control room's browser test, headless).
system-deps:
	@command -v haproxy >/dev/null 2>&1 && command -v wrk >/dev/null 2>&1 \
	  && command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq \
	  && $$SUDO apt-get install -y -qq haproxy wrk chromium chromium-driver; }

# Two processes, a test file each at a time: most tests wait on brokers, subprocesses and
# real time, so two share the 2-core CI machine well (about 60 % of the serial wall time).
# The heaviest files (marked serial, tests/conftest.py: HEAVY_FILES) run after, alone.
# Both runs always run; make fails if either failed.
test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not serial"; a=$$?; \
	$(BIN)/python -m pytest -m serial; b=$$?; [ $$a -eq 0 ] && [ $$b -eq 0 ]

bench: $(STAMP)
	$(BIN)/python benchmarks/produce.py

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
