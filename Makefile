# FoldServe: `make run` serves the default models, `make test` runs lint, types and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
REPOSITORY ?= models
DEFAULT_MODELS := digits_cnn breast_cancer_mlp resnet_bench

.PHONY: setup run models retrain serve test lint typecheck pytest bench clean

setup: $(STAMP)

# Python caches the bytecode of what it imports (its default) in every process these targets
# start, even where the environment sets PYTHONDONTWRITEBYTECODE. With it set, each process
# compiled again what others had compiled, unless installing compiled every module of every
# package ahead, most of which nothing imports. Now the first process to import a module
# caches it (docs/benchmarks.md, "Test suite time").
unexport PYTHONDONTWRITEBYTECODE

# uv installs what pip would (the same versions), in parallel. torch first, pinned, from the
# local wheels pip is configured to find (pip.conf's find-links or PIP_FIND_LINKS: the CPU
# build here), so no CUDA build is pulled.
UV := $(BIN)/uv pip install --python $(BIN)/python -q
FIND_LINKS = $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
# The venv starts without pip (ensurepip alone took 7 s) and gets uv from this Python's pip;
# uv then adds pip to it as well, for whoever uses it there.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv --without-pip $(VENV)
	$(PYTHON) -m pip --python $(BIN)/python install -q uv
	$(UV) $(foreach links,$(FIND_LINKS),--find-links $(links)) torch==2.13.0
	$(UV) -e '.[serve,train,dev]' pip
	# Public architectures for the fold tests (tests/foldserve/test_onnx_fold_networks.py) and
	# bench/fold_sites.py: --no-deps, as geffnet declares torchvision, whose PyPI build
	# pulls another torch; these models import neither.
	$(UV) --no-deps efficientnet_pytorch==0.7.1 geffnet==1.0.2 pytorchcv==0.0.74
	touch $(STAMP)

# Train and export each default model that the repository lacks.
models: $(STAMP)
	$(BIN)/python -m training defaults --repository $(REPOSITORY) --runs runs

# Retrain MODEL with the configuration its latest version recorded; export the next version.
# LOAD=http://127.0.0.1:8000: then that running server serves it on every worker (API key, if
# the server has one: FOLDSERVE_API_KEY in the environment).
ifneq ($(filter retrain,$(MAKECMDGOALS)),)
ifndef MODEL
$(error usage: make retrain MODEL=digits_cnn [LOAD=http://$(HOST):$(PORT)])
endif
endif
retrain: $(STAMP)
	$(BIN)/python -m training retrain --repository $(REPOSITORY) --name $(MODEL) \
		$(if $(LOAD),--load $(LOAD))

serve: $(STAMP)
	$(BIN)/python -m service --repository $(REPOSITORY) --host $(HOST) --port $(PORT)

run: models serve

lint: $(STAMP)
	$(BIN)/ruff check training service foldserve tests bench
	$(BIN)/ruff format --check training service foldserve tests bench

# mypy's cache lives with the user's other tool caches, as uv's does, not in the checkout: a new
# clone is checked against it instead of from nothing (docs/benchmarks.md, "Test suite time").
# mypy keys each entry by module and checks it against the source's hash, the options and its
# own version, so what changed is checked again, never trusted.
MYPY_CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/foldserve/mypy
export MYPY_CACHE_DIR

typecheck: $(STAMP)
	$(BIN)/mypy

# pytest-xdist: one test process per CPU (PYTEST_WORKERS=0: one process, as plain pytest),
# each test file whole in one process, so a module's fixtures are built once.
PYTEST_WORKERS ?= auto
pytest: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

# mypy runs beside pytest, in the CPU time pytest leaves idle while it waits on servers
# (docs/benchmarks.md, "Test suite time"); its report follows pytest's, whole, and either
# failing fails the target.
test: lint
	@report=$$(mktemp); $(BIN)/mypy > $$report 2>&1 & types=$$!; \
	$(MAKE) --no-print-directory pytest; tests=$$?; \
	wait $$types; typed=$$?; echo "$(BIN)/mypy"; cat $$report; rm -f $$report; \
	[ $$tests -eq 0 ] && [ $$typed -eq 0 ]

clean:
	rm -rf $(VENV) runs .mypy_cache .ruff_cache .pytest_cache
	find training service foldserve tests bench -name __pycache__ -prune -exec rm -rf {} +
