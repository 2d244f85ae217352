# make smoke / make test bootstrap .venv on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The PyTorch build to install; on another machine, e.g. make TORCH="torch torchvision --index-url ..."
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv smoke test test-slow lint screenshot clean

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	@echo "Setting up $(VENV) (once): $(TORCH), then DALI, MLflow and the rest."
	@echo "PyTorch's default Linux build brings NVIDIA's CUDA libraries: about 7 GB on disk in all. On a machine"
	@echo "without a GPU the CPU build is enough: make TORCH=\"torch torchvision --index-url https://download.pytorch.org/whl/cpu\""
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar on $(TORCH)
	@$(BIN)/python -c "import torchvision" 2>/dev/null || { echo "error: torchvision does not load with the torch installed by TORCH=\"$(TORCH)\": take both from one build (one index), then rm -rf $(VENV) and run make again."; exit 1; }
	$(BIN)/pip install --progress-bar on -e '.[dev]'
	touch $@

smoke: venv
	$(BIN)/python -m pipeline.train configs/mini.yaml

# test: lint, then everything but the multi-process, server and cluster runs (marked slow)
test: venv
	$(BIN)/ruff check pipeline launch tests docker
	$(BIN)/hadolint docker/Dockerfile
	$(BIN)/python -m pytest -m "not slow"

# test-slow: real torchrun, mlflow server and SLURM runs (the SLURM ones need tests/slurm/cluster.sh install)
test-slow: venv
	$(BIN)/python -m pytest -m slow

# screenshot: docs/mlflow-run.png from a real smoke run against a local mlflow server (needs Debian's chromium:
# apt-get install chromium; playwright, in the dev extra, drives it)
screenshot: venv
	$(BIN)/python docs/screenshot.py

lint: venv
	$(BIN)/ruff check pipeline launch tests docker
	$(BIN)/hadolint docker/Dockerfile

clean:
	rm -rf runs data/mini-imagenet
