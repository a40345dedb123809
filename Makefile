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

.PHONY: install install-dev system-deps demo demo-oss test lint ui clean bench-env

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

# The demo with input and output in OSS: the local OSS-protocol server from the tests (loopback, signed requests),
# seeded with the sample corpus. The key pair is a throwaway one for this local server.
demo-oss: install-dev $(DAGSTER_HOME)/dagster.yaml
	$(VPY) -m asr_assets.sample_corpus --out $(SAMPLE_DIR)
	@export OSS_ACCESS_KEY_ID=demo-key-id OSS_ACCESS_KEY_SECRET=demo-secret-$$RANDOM$$RANDOM; \
	rm -f $(DAGSTER_HOME)/oss-endpoint; \
	$(VPY) -m tests.oss_server --bucket demo --seed-from $(SAMPLE_DIR)/media --seed-prefix media/ \
	  --endpoint-file $(DAGSTER_HOME)/oss-endpoint > $(DAGSTER_HOME)/oss-server.log 2>&1 & server=$$!; \
	trap "kill $$server 2>/dev/null" EXIT; \
	for i in $$(seq 50); do [ -s $(DAGSTER_HOME)/oss-endpoint ] && break; sleep 0.2; done; \
	export OSS_ENDPOINT=$$(cat $(DAGSTER_HOME)/oss-endpoint) ASR_SOURCE_URI=oss://demo/media ASR_OUTPUT_ROOT=oss://demo/out \
	  ASR_CACHE_DIR=$(CURDIR)/data/cache-oss; \
	for shard in $$($(VPY) -c 'from partitions import shard_partitions as p; print(*p.get_partition_keys())'); do \
	  echo "== materializing $$shard (OSS in and out)"; \
	  $(VENV)/bin/dagster asset materialize -m asr_assets.definitions --select 'group:asr' --partition $$shard \
	    > $(DAGSTER_HOME)/demo-oss-$$shard.log 2>&1 || { tail -50 $(DAGSTER_HOME)/demo-oss-$$shard.log; exit 1; }; \
	done; \
	$(VPY) -m asr_assets.summary --output-root oss://demo/out --references $(SAMPLE_DIR)/references.jsonl \
	  --media-root oss://demo/media

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
