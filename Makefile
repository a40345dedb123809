# asr-distill: `make demo` runs the whole pipeline on a generated sample corpus; `make test` runs the test suite.
# Both install what is missing first (apt packages when run as root or with sudo, then a .venv) and are idempotent.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
SILERO_VAD := silero-vad==6.2.3
APT_PACKAGES := ffmpeg espeak-ng sox

export DAGSTER_HOME ?= $(CURDIR)/.dagster
export ASR_SOURCE_URI ?= $(CURDIR)/data/sample/media
export ASR_OUTPUT_ROOT ?= $(CURDIR)/data/out
SAMPLE_DIR := $(CURDIR)/data/sample

.PHONY: install install-dev system-deps demo test lint ui clean bench-env

system-deps:
	@missing=""; for tool in ffmpeg espeak-ng sox; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "need root or sudo to install: $(APT_PACKAGES)"; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi

$(VENV)/.installed: pyproject.toml | system-deps
	@test -n "$(PYTHON)" || { echo "Python 3.11 not found"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e .
	# The wheel carries the ONNX model; its declared deps would pull torch + CUDA, which nothing here imports.
	$(VPY) -m pip install -q --no-deps $(SILERO_VAD)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(VPY) -m pip install -q -e '.[dev]'
	touch $@

install: system-deps $(VENV)/.installed

install-dev: install $(VENV)/.installed-dev

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(VPY) -m asr_assets.sample_corpus --out $(SAMPLE_DIR)
	@for shard in $$($(VPY) -c 'from partitions import shard_partitions as p; print(*p.get_partition_keys())'); do \
	  echo "== materializing $$shard"; \
	  $(VENV)/bin/dagster asset materialize -m asr_assets.definitions --select 'group:asr' --partition $$shard \
	    > $(DAGSTER_HOME)/demo-$$shard.log 2>&1 || { tail -50 $(DAGSTER_HOME)/demo-$$shard.log; exit 1; }; \
	done
	@echo "== distillation_report"
	@$(VENV)/bin/dagster asset materialize -m asr_assets.definitions --select distillation_report \
	  --config-json '{"ops": {"distillation_report": {"config": {"references": "$(SAMPLE_DIR)/references.jsonl"}}}}' \
	  > $(DAGSTER_HOME)/demo-report.log 2>&1 || { tail -50 $(DAGSTER_HOME)/demo-report.log; exit 1; }
	@$(VPY) -m asr_assets.summary --output-root $(ASR_OUTPUT_ROOT) --references $(SAMPLE_DIR)/references.jsonl \
	  --media-root $(ASR_SOURCE_URI)

test: install-dev
	$(VPY) -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

ui: install $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# Benchmarks compare against reference implementations that need torch (silero-vad's own path); they get their own
# venv so the product's stays torch-free. torch==2.13.0 is the CPU build pip finds on this machine's disk.
bench-env: .venv-bench/.installed

.venv-bench/.installed: pyproject.toml | system-deps
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q -e . torch==2.13.0
	.venv-bench/bin/python -m pip install -q --no-deps $(SILERO_VAD)
	touch $@

clean:
	rm -rf data/out data/sample .dagster
