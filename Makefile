# DermaNet: two commands. `make test` sets everything up on a fresh machine and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: venv test lint format clean demo browser postgres prometheus

$(STAMP): pyproject.toml
	$(PY) -m pip --version >/dev/null 2>&1 || python3 -m venv --clear $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The main job: local Ray + Serve (shipped weights) + Streamlit dashboard; Ctrl-C stops it.
demo: $(STAMP)
	$(PY) -m dermanet.demo $(DEMO_ARGS)

# Debian's Chromium for the browser test (the test skips with the reason when it is absent).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } || echo "chromium not installed: the browser test will skip"

# Debian's PostgreSQL server for the database tests, which start a private one in a temp folder
# (they skip with the reason when it is absent; SQLite needs nothing).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql; } || echo "postgresql not installed: the PostgreSQL database tests will skip"

# Debian's Prometheus for `promtool check rules` on the alert rules (the test skips when absent).
prometheus:
	@command -v promtool >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } || echo "prometheus not installed: the alert-rules test will skip"

test: lint browser postgres prometheus
	$(PY) -m pytest -q -ra --durations=20 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
