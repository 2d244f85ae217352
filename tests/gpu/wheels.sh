#!/usr/bin/env bash
# Fetches, on a machine with the package index, the wheels that tests/gpu/run.sh needs on a GPU machine
# holding only PyTorch and its usual company (torchvision, Pillow, psutil, PyYAML, tqdm, pytest):
# omegaconf. They land in .whl/ (ignored by git); carry that folder along and run.sh installs them.
# DALI and MLflow are not needed: the GPU checks use synthetic data and no tracking server.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
PY_VERSION="${PY_VERSION:-3.12}"  # the GPU machine's Python
rm -rf .whl && mkdir .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "omegaconf>=2.3"
ls .whl
