# Switchyard: `make run` starts everything with demo data, `make test` runs the whole suite.
# Only Python 3.11 is needed: PostgreSQL and Redis are embedded unless DATABASE_URL /
# REDIS_URL point at running servers.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test install lint typecheck check-compose bench lock clean

run: $(STAMP)
	$(PY) scripts/fetch_assets.py
	$(PY) -m marketplace.devenv run

test: $(STAMP)
	$(PY) scripts/fetch_assets.py
	scripts/check-compose.sh
	scripts/ensure-browser.sh
	$(PY) -m marketplace.devenv test -- $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): requirements/lock.txt requirements/nodeps.txt assets.lock.json
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==0.13.9
	$(UV) pip sync --quiet --python $(PY) --require-hashes requirements/lock.txt
	$(UV) pip install --quiet --python $(PY) --no-deps --require-hashes -r requirements/nodeps.txt
	$(PY) scripts/fetch_assets.py
	touch $(STAMP)

check-compose: $(STAMP)
	scripts/check-compose.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy routing billing

lock:
	$(UV) pip compile pyproject.toml --extra models --extra dev --generate-hashes \
		--python-version 3.11 -o requirements/lock.txt
	$(UV) pip compile requirements/nodeps.in --no-deps --generate-hashes \
		--python-version 3.11 -o requirements/nodeps.txt

bench: $(STAMP)
	$(PY) -m marketplace.devenv exec -- $(PY) -m bench

clean:
	rm -rf var/test
