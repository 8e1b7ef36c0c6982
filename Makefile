# DermaNet: two commands. `make test` sets everything up on a fresh machine and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: venv test lint format clean demo browser postgres prometheus system-packages

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

# Debian packages the tests start for real: how to tell each is installed, and what skips (with
# the reason) without it. The database tests start a private PostgreSQL server in a temp folder;
# SQLite needs nothing. Prometheus ships `promtool check rules` for the alert rules.
chromium_CHECK := command -v chromium
chromium_SKIPS := the browser test
postgresql_CHECK := ls /usr/lib/postgresql/*/bin/initdb
postgresql_SKIPS := the PostgreSQL database tests
prometheus_CHECK := command -v promtool
prometheus_SKIPS := the alert-rules test

# Install whichever of the packages $(1) are missing: one `apt-get update` and one install on a
# clean machine (then one at a time if that fails, so a package that cannot install costs only
# its own tests); each one still missing is named with what will skip.
define apt_install
@missing=""; \
$(foreach p,$(1),$($(p)_CHECK) >/dev/null 2>&1 || missing="$$missing $(p)";) \
if [ -n "$$missing" ]; then \
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; } || \
  for p in $$missing; do apt-get install -y -qq --no-install-recommends $$p; done; \
fi; \
$(foreach p,$(1),$($(p)_CHECK) >/dev/null 2>&1 || echo "$(p) not installed: $($(p)_SKIPS) will skip";) true
endef

browser:
	$(call apt_install,chromium)

postgres:
	$(call apt_install,postgresql)

prometheus:
	$(call apt_install,prometheus)

system-packages:
	$(call apt_install,chromium postgresql prometheus)

test: lint system-packages
	$(PY) -m pytest -q -ra --durations=20 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
