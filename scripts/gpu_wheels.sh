#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that scripts/gpu_check.sh installs on the GPU
# machine, whose image has torch, transformers, tokenizers, numpy and xxhash but not
# mosaicml-streaming, the compressors it imports, or torchao (--float8). Run it here, where
# PyPI is reachable; the GPU machine reaches nothing. The image's Python is 3.12 on x86-64.
# Versions are the ones the tests pass with (pip list in .venv), but zstd: 1.5.7.2 has no
# wheel for Python 3.12 and the later ones that have are yanked, so the one before.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  mosaicml-streaming==0.13.0 catalogue==2.0.10 brotli==1.2.1 python-snappy==0.7.3
  cramjam==2.14.0 zstd==1.5.6.1 torchao==0.13.0
)
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls .whl
du -sh .whl
