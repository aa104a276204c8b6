#!/usr/bin/env bash
# Set up a development environment in .venv: the pinned stack, then this package (editable).
# Usage: bash scripts/setup.sh            (PEER_ATTENTION_BUILD_CUDA=0|1 and TORCH_CUDA_ARCH_LIST are honoured)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-ci.txt
# --no-build-isolation: the build must see the torch it will run against (the CUDA extension
# compiles against its headers and ABI).
.venv/bin/python -m pip install -q --no-build-isolation -e .
.venv/bin/python -c "import peer_attention as pa; print('peer_attention', pa.__version__, 'backends:', pa.available_backends())"
