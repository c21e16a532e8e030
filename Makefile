# Baton: the two commands are `make run` and `make test`; both set up what is missing first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.baton-setup
# checkov (the security scan of the Helm chart and the Dockerfile) pins older networkx/packaging/python-dateutil
# than requirements-lock.txt, so it gets a venv of its own; tests/test_helm_chart.py runs its CLI from there.
SCAN_VENV ?= .venv-scan
SCAN_STAMP := $(SCAN_VENV)/.baton-setup
TORCH_CPU_VERSION := 2.13.0
# Debian packages the tests need: the RDMA/NUMA/curl libraries Mooncake's transfer engine links against, and
# redis-server (the cluster's registry and cache-event streams; tests start their own on free ports), and
# prometheus (prometheus + promtool: the alert rules' unit tests and a live Prometheus scraping a test cluster; tests
# start their own on a free port with a temporary config and data directory, the package's service plays no part).
SYSTEM_PACKAGES := libibverbs1 librdmacm1 libnuma1 libcurl4 redis-server prometheus

.PHONY: help setup sysdeps protos run test lint clean chart-files

help:
	@echo "make run    - set up if needed, then start the cluster (baton up: Redis, router, 1 prefill + 2 decode pods"
	@echo "              on Ray) on a tiny random model, chat with it through the OpenAI API, and stop it"
	@echo "make test   - set up if needed, then run the whole test suite"
	@echo "make lint   - ruff"
	@echo "make chart-files - copy deploy/prometheus/baton-rules.yaml and deploy/grafana/*.json into the Helm chart"

setup: sysdeps $(STAMP) $(SCAN_STAMP) protos

sysdeps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "[setup] installing system packages:" $$missing; \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Generated gRPC code (protos/gen, never committed), rebuilt when a .proto changes.
protos: $(STAMP)
	@$(PY) -c "import services.common.protos"

# A GPU image brings its own CUDA torch: reuse it through --system-site-packages instead of
# downloading another one. Elsewhere install the CPU build (the multi-GB CUDA wheel is useless
# without a GPU), pinned with its +cpu tag so that no index can substitute the CUDA wheel: from pip's
# find-links (with torch's own dependencies from the configured index), else from the PyTorch CPU index.
$(STAMP): pyproject.toml requirements-lock.txt requirements-gpu.txt Makefile
	@set -e; \
	if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  echo "[setup] system torch with CUDA found: venv shares it"; \
	  [ -x $(PY) ] || $(PYTHON) -m venv --system-site-packages $(VENV); \
	  grep -v -E '^(triton|mooncake-transfer-engine-non-cuda)==' requirements-lock.txt > $(VENV)/requirements-cuda.txt; \
	  echo "[setup] installing pinned dependencies (GPU: image torch/triton kept, flashinfer, CUDA Mooncake)"; \
	  $(PIP) install -q -r $(VENV)/requirements-cuda.txt -r requirements-gpu.txt; \
	  $(PIP) install -q --no-build-isolation --no-deps -e . ; \
	else \
	  [ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	  $(PIP) install -q --upgrade pip >/dev/null; \
	  if ! $(PY) -c "import torch" 2>/dev/null; then \
	    echo "[setup] installing torch $(TORCH_CPU_VERSION) (CPU build)"; \
	    $(PIP) install -q torch==$(TORCH_CPU_VERSION)+cpu 2>/dev/null || \
	    $(PIP) install -q torch==$(TORCH_CPU_VERSION)+cpu --extra-index-url https://download.pytorch.org/whl/cpu; \
	  fi; \
	  echo "[setup] installing pinned dependencies"; \
	  $(PIP) install -q -r requirements-lock.txt; \
	  $(PIP) install -q --no-deps -e . ; \
	fi
	@touch $(STAMP)

$(SCAN_STAMP): requirements-scan.txt
	@set -e; \
	[ -x $(SCAN_VENV)/bin/python ] || $(PYTHON) -m venv $(SCAN_VENV); \
	echo "[setup] installing checkov into $(SCAN_VENV)"; \
	$(SCAN_VENV)/bin/python -m pip install -q -r requirements-scan.txt
	@touch $(SCAN_STAMP)

run: setup
	$(PY) -m services.launch.demo

# BATON_REQUIRE_SCAN: here the chart's security scan must run (setup installed it), not skip.
test: setup
	$(VENV)/bin/ruff check .
	BATON_REQUIRE_SCAN=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

# The chart reads files only from inside itself: it carries copies of the alert rules and dashboards
# (tests/test_helm_chart.py fails while they differ from deploy/).
chart-files:
	@set -e; \
	if [ -f deploy/prometheus/baton-rules.yaml ]; then cp deploy/prometheus/baton-rules.yaml helm/baton/files/baton-rules.yaml; fi; \
	if ls deploy/grafana/*.json >/dev/null 2>&1; then \
	  rm -f helm/baton/files/dashboards/*.json; cp deploy/grafana/*.json helm/baton/files/dashboards/; \
	fi

clean:
	rm -rf $(VENV) $(SCAN_VENV) .pytest_cache .ruff_cache .hypothesis
