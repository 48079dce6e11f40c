# Lynx: one Makefile for set-up, demo, tests, models and benchmarks (see README.md).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lynx-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint models bench bench-quick testbed ladders dashboards deploy-check prometheus clean-venv python-versions link-keys gpu-check compose-smoke

# Idempotent: the virtualenv is (re)installed only when pyproject.toml changed.
$(STAMP): pyproject.toml
	@bash scripts/setup_venv.sh $(PYTHON) $(VENV)
	@touch $(STAMP)

setup: $(STAMP)

# Real Prometheus server (Debian package) for the integration tests.
prometheus:
	@bash scripts/ensure_prometheus.sh

demo: setup
	$(PY) -m lynx.serving.demo

# --timeout: no test may hang CI (one that runs 15 minutes fails; PYTEST_ARGS may override).
# Two parts: every test but the `serial` ones on TEST_WORKERS pytest-xdist workers (the
# tests that start several servers at once form one unit, `SERVER_GROUP` in test/conftest.py:
# one at a time, for memory), then the `serial` ones alone (their assertions rest on measured
# latency or wall-clock bounds). Exit 5 (PYTEST_ARGS chose no test of a part) is no failure.
TEST_WORKERS ?= 2
test: setup prometheus
	$(PY) -m pytest -q --timeout=900 -n $(TEST_WORKERS) -m "not serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -q --timeout=900 -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

# Python 3.12 / 3.13 (SGLang's image and the GPU machine run 3.12): the built wheel's
# torch-free tests, its resolution next to sglang==0.5.23, its entry point, the selection tests.
python-versions: setup
	bash scripts/python_versions.sh

# Quick loop for development: everything but the end-to-end server tests.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy lynx_policy lynx_protocol

models: setup
	$(PY) -m lynx.reference.train --model all
	$(PY) -m lynx.reference.evaluate --model all

# Stock vs Lynx benchmarks: JSON + PNG under benchmark/results/, benchmark/RESULTS.md.
bench: setup
	$(PY) benchmark/run_all.py

bench-quick: setup
	$(PY) benchmark/run_all.py --quick

# The decode-bound testbed (widened fp32 copies, cached under .cache/bench/models; ~5 GB) and,
# with TESTBED_MEASURE=1, its MoE share, speedup and TPOT ratio (benchmark/results/testbed.json).
testbed: setup
	$(PY) benchmark/testbed.py --models qwen3-moe-128,qwen3-moe-mini --build-only
	@if [ "$(TESTBED_MEASURE)" = "1" ]; then $(PY) benchmark/testbed.py --models qwen3-moe-128,qwen3-moe-mini; fi

# Ladders shipped with the reference checkpoints (models/<m>/lynx_ladder.json; minutes).
ladders: setup
	for m in mixtral-mini qwen3-moe-mini qwen3-moe-128; do $(PY) -m lynx.serving.cli calibrate $$m --ladder --out models/$$m/lynx_ladder.json || exit 1; done

# Deployment files (compose, Prometheus, Grafana dashboard) are generated from lynx/deploy.
dashboards: setup
	$(PY) -m lynx.deploy generate

# One-shot GPU check (Triton vs spec, CUDA-graph capture, MoE layer at production shapes).
gpu-check:
	bash scripts/gpu_check.sh

# CURVE keys of the compose stacks' controller link (docker/secrets/link/, never committed).
link-keys: setup
	bash scripts/link_keys.sh 2

# The Docker images built for real and the CPU compose stack up and checked (docker/README.md,
# "Smoke test"): starts its own dockerd when none runs; root for apt-get/debootstrap.
compose-smoke: setup
	bash scripts/compose_smoke.sh

deploy-check: setup
	$(PY) -m lynx.deploy generate --check

clean-venv:
	rm -rf $(VENV)
