# Two commands set everything up on a fresh Debian machine:
#   make run   - the product on embedded defaults (SQLite, file-system broker, demo PACS)
#   make test  - the whole suite against PostgreSQL, Redis, Orthanc, dcmtk and Chromium

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

# Debian packages the suite drives as real peers, and what WeasyPrint renders with.
TEST_DEBS := orthanc dcmtk xorriso genisoimage chromium chromium-driver poppler-utils zbar-tools \
	fonts-dejavu-core fonts-liberation2 libpango-1.0-0 libpangoft2-1.0-0

TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/pockethealth
TEST_BROKER_URL ?= redis://127.0.0.1:6379/15
TEST_CACHE_URL ?= redis://127.0.0.1:6379/10

.PHONY: run test venv services debs bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The address printed, and written on Access and Request Pages, follows HOST and PORT
# unless SITE_URL says otherwise.
run: export SITE_URL := $(or $(SITE_URL),http://$(HOST):$(PORT))
run: $(STAMP)
	$(PY) manage.py migrate --noinput
	$(PY) manage.py demo_setup
	$(PY) manage.py serve --host $(HOST) --port $(PORT)

# Install the Debian packages the suite needs, when missing.
debs:
	@missing=""; for p in $(TEST_DEBS); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "Installing:$$missing"; \
		SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# Start PostgreSQL and Redis on localhost when they are down.
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || { \
		echo "Starting PostgreSQL"; \
		pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | sort -V | tail -1) main start; \
		for i in $$(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done; }
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { \
		echo "Starting Redis"; mkdir -p /var/lib/redis /var/log/redis; \
		redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
			--dir /var/lib/redis --logfile /var/log/redis/ci.log; \
		for i in $$(seq 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done; }

test: $(STAMP) debs services
	DATABASE_URL=$(TEST_DATABASE_URL) CELERY_BROKER_URL=$(TEST_BROKER_URL) CACHE_URL=$(TEST_CACHE_URL) \
		PH_VAR_DIR=$(CURDIR)/var/test DJANGO_ALLOW_ASYNC_UNSAFE=true \
		$(PY) -m pytest $(PYTEST_ARGS)

# Each benchmark runs against its peer in the same run; one that fails does not stop the
# others, but makes the target fail. BENCH_POSTGRES is the server on which a benchmark may
# create (and drop) a throwaway database.
BENCH_POSTGRES ?= postgres://postgres@127.0.0.1:5432/

bench: $(STAMP) debs services
	@shopt -s nullglob; failed=""; \
	for b in bench/*.py; do \
		echo "== $$b"; \
		BENCH_POSTGRES=$(BENCH_POSTGRES) $(PY) $$b || failed="$$failed $$b"; \
	done; \
	if [ -n "$$failed" ]; then echo "failed:$$failed"; exit 1; fi

# The browser viewer: OHIF's prebuilt app (npm package @ohif/app, version and SHA-512
# pinned in viewer/ohif.py), fetched once with npm into var/ohif and trimmed there.
OHIF_STAMP := var/ohif/ohif-install.json

.PHONY: ohif
ohif: $(OHIF_STAMP)

# Node.js and npm fetch the viewers from the npm registry; Debian's packages when absent.
.PHONY: node
node:
	@command -v npm >/dev/null 2>&1 || { \
		echo "Installing: nodejs npm"; SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs npm >/dev/null; }

$(OHIF_STAMP): viewer/ohif.py | $(STAMP) node
	$(PY) manage.py ohif_install --force

run test bench: $(OHIF_STAMP)
# bench/viewer.py's peer is the same app reading Orthanc's DICOMweb plugin.
TEST_DEBS += orthanc-dicomweb

# The offline viewer that goes on ZIP and disc media: its npm packages pinned by
# viewer/offline/package-lock.json, built into viewer/offline/dist (MEDIA_VIEWER_DIR).
OFFLINE_VIEWER := viewer/offline
OFFLINE_VIEWER_STAMP := $(OFFLINE_VIEWER)/dist/.built
OFFLINE_VIEWER_SOURCES := $(addprefix $(OFFLINE_VIEWER)/,index.html viewer.js viewer.css \
	build.js package.json package-lock.json) $(wildcard $(OFFLINE_VIEWER)/licenses/*)

.PHONY: offline-viewer
offline-viewer: $(OFFLINE_VIEWER_STAMP)

$(OFFLINE_VIEWER_STAMP): $(OFFLINE_VIEWER_SOURCES) | node
	cd $(OFFLINE_VIEWER) && npm ci --no-audit --no-fund --ignore-scripts && node build.js
	touch $@

run test bench: $(OFFLINE_VIEWER_STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) var
