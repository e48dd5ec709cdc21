# dpo-cluster — the two commands a newcomer needs:
#   make demo   set up (once), build, and run the tiny end-to-end demo
#   make test   set up (once), build, lint, and run every test
# Set-up installs what is missing (Debian packages, the PyTorch 2.11.0 venv kept in
# $(DPO_VENV), reused across checkouts) and is a no-op the second time.

DPO_VENV ?= $(HOME)/.cache/dpo-cluster/venv
export DPO_VENV
export VIRTUAL_ENV := $(DPO_VENV)
export PATH := $(DPO_VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
export DPO_PYTHON := $(DPO_VENV)/bin/python

CARGO ?= cargo
DEMO_DIR ?= out/demo

.PHONY: setup build test chart-test lint demo demo-lora bench sim gpu-bundle clean

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --workspace --all-targets

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: build lint
	$(CARGO) test --workspace --no-fail-fast
	$(DPO_PYTHON) -m unittest discover -s deploy/tests -v

# More seeds of the coordinator's simulation than `make test` runs (SEEDS=N).
SEEDS ?= 10000
sim: setup
	$(CARGO) run --release -p dpo-coordinator --bin dpo-sim -- --seeds $(SEEDS)

# The Helm chart and Dockerfiles alone (render, validate, lint; needs built binaries).
chart-test: setup
	$(CARGO) build -p dpo-coordinator -p dpo-worker --bins
	$(DPO_PYTHON) -m unittest discover -s deploy/tests -v

demo: setup
	$(CARGO) build -p dpo-worker -p dpo-coordinator -p dpoctl
	@bash examples/demo.sh $(DEMO_DIR)

# The same with LoRA adapters (examples/runs/dpo-lora.toml).
demo-lora: setup
	$(CARGO) build -p dpo-worker -p dpo-coordinator -p dpoctl
	@bash examples/demo.sh $(DEMO_DIR) lora

bench: setup
	$(DPO_PYTHON) -m pip install -q -r bench/requirements.txt
	$(CARGO) build --release -p dpo-worker --bin dpo-worker --example fwd_bwd
	$(DPO_PYTHON) bench/model_throughput.py
	$(DPO_PYTHON) bench/dpo_step_time.py
	$(DPO_PYTHON) bench/ner_step_time.py

# What scripts/gpu-check.sh needs on the GPU machine (no Rust, no network there):
# stripped release binaries and the trl wheels, in gpu-bundle/ (git-ignored, < 60 MiB).
gpu-bundle: setup
	@bash scripts/gpu-bundle.sh gpu-bundle

clean:
	$(CARGO) clean
	rm -rf out
