#!/usr/bin/env bash
# The release wheel: peer_attention._C for every architecture the project serves,
# build_cuda.RELEASE_ARCHS = "8.0;8.6;8.9;9.0a;10.0;12.0" (+ PTX of 12.0, added by build_cuda),
# into WHEEL_DIR (default dist/). Not part of CI (CI builds "8.0;9.0a": .ci/build_cuda.sh); run it
# on a machine with cores to spare (MAX_JOBS, default all cores).
# Usage: .ci/build_release_wheel.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-${PYTHON:-python}}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c 'import build_cuda; print(build_cuda.RELEASE_ARCHS)')}"
export PEER_ATTENTION_BUILD_CUDA=1
WHEEL_DIR="${WHEEL_DIR:-dist}"
echo "build_release_wheel: archs '${TORCH_CUDA_ARCH_LIST}', MAX_JOBS=${MAX_JOBS}"
start=$(date +%s)
"$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$WHEEL_DIR" .
echo "build_release_wheel: $(( $(date +%s) - start )) s"
ls -l "$WHEEL_DIR"/peer_attention-*.whl
