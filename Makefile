# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DYPO_CACHE_DIR := $(CURDIR)/.cache
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR := cpu
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: install demo test lint clean images bench-learning

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first, pinned exactly, so no dependency can pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	# the venv's bin first on PATH: fast-downward-textworld (an ALFWorld dependency) builds by calling `python`
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dypo train --config configs/tiny-cpu.yaml --run runs/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# Learning curves of the default config and its ablations over 3 seeds (hours on 2 cores; see docs/learning.md).
bench-learning: $(STAMP)
	$(BIN)/python -m bench.learning

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs .dypo .cache

# Container images (images/*/Dockerfile), tagged $(IMAGE_PREFIX)dypo-<family>:<version>. Needs a Docker daemon, or
# CONTAINER_ENGINE=podman. Extra flags for every build (e.g. --build-arg BASE_IMAGE=…) go in IMAGE_BUILD_ARGS.
CONTAINER_ENGINE ?= docker
IMAGE_PREFIX ?=
IMAGES ?= cpu rollout-gpu train-gpu
IMAGE_BUILD_ARGS ?=
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
REVISION := $(shell git rev-parse --short=12 HEAD 2>/dev/null)$(shell git diff --quiet HEAD 2>/dev/null || echo .dirty)

images:
	@$(CONTAINER_ENGINE) info >/dev/null 2>&1 || { echo "make images: '$(CONTAINER_ENGINE) info' failed; start a Docker daemon or use CONTAINER_ENGINE=podman"; exit 1; }
	@for family in $(IMAGES); do \
	  echo "building $(IMAGE_PREFIX)dypo-$$family:$(VERSION) ($(REVISION))"; \
	  $(CONTAINER_ENGINE) build -f images/$$family/Dockerfile -t $(IMAGE_PREFIX)dypo-$$family:$(VERSION) \
	    --build-arg DYPO_VERSION=$(VERSION) --build-arg DYPO_REVISION=$(REVISION) $(IMAGE_BUILD_ARGS) . || exit 1; \
	done
