#!/usr/bin/env bash
# Fetches, on a machine with the package index, the wheels that tests/gpu/run.sh needs on a GPU machine
# holding only PyTorch and its usual company (torchvision, numpy, Pillow, psutil, PyYAML, tqdm, pytest):
# omegaconf, into .whl/ (ignored by git); carry that folder along and run.sh installs them.
# DALI=1 also fetches NVIDIA DALI and its wheels (about 270 MB) for the checks of the `mixed` decoder, as one
# archive cut into parts of PART_MB (default 48) in .whl-dali/: a machine that takes at most 64 MiB per call
# gets one part per call (the parts left by earlier calls stay on a warm machine), and run.sh joins and installs
# them once .whl-dali/SHA256SUMS and every part it names are there. MLflow is not needed: no tracking server.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
PY_VERSION="${PY_VERSION:-3.12}"  # the GPU machine's Python
PART_MB="${PART_MB:-48}"
download() {  # manylinux wheels for the GPU machine's Python
    "$PYTHON" -m pip download -q --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 "$@"
}
rm -rf .whl && mkdir .whl
download --no-deps -d .whl "omegaconf>=2.3"
ls .whl
if [ "${DALI:-0}" = 1 ]; then
    staging="$(mktemp -d)"
    download -d "$staging" "nvidia-dali-cuda130==2.4.0"
    # what a PyTorch machine already has
    rm -f "$staging"/numpy-* "$staging"/packaging-* "$staging"/pyyaml-* "$staging"/typing_extensions-* \
          "$staging"/wheel-*
    rm -rf .whl-dali && mkdir .whl-dali
    tar -C "$staging" -cf - . | split -b "${PART_MB}M" -d - .whl-dali/dali.tar.part-
    (cd .whl-dali && sha256sum dali.tar.part-* > SHA256SUMS)
    rm -rf "$staging"
    echo "carry .whl-dali/SHA256SUMS with the first part, then one part per call:"
    ls -l .whl-dali
fi
