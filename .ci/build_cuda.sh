#!/usr/bin/env bash
# Build the CUDA extension peer_attention._C for sm_80 and sm_90a (editable install) and a wheel,
# then check the extension imports and the cuda backend explains why it cannot run (no GPU here).
# Called by CI after the package is installed. Usage: .ci/build_cuda.sh [python]
# Environment: MAX_JOBS (default 2), TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), WHEEL_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-${PYTHON:-python}}"
export MAX_JOBS="${MAX_JOBS:-2}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}"
export PEER_ATTENTION_BUILD_CUDA=1
WHEEL_DIR="${WHEEL_DIR:-dist}"

echo "build_cuda: archs '${TORCH_CUDA_ARCH_LIST}', MAX_JOBS=${MAX_JOBS}, $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s)
"$PYTHON" -m pip install --no-build-isolation --no-deps -e .
mid=$(date +%s)
echo "build_cuda: extension build (pip install -e .) took $((mid - start)) s"

"$PYTHON" - <<'PY'
import torch
import peer_attention
from peer_attention import _C  # noqa: F401
for op in ("peer_attention::cuda_fwd", "peer_attention::cuda_bwd"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
reason = peer_attention.available_backends()["cuda"]
print("build_cuda: peer_attention._C imports; cuda backend:", reason or "available")
if not torch.cuda.is_available():
    assert reason == "no CUDA device is visible", reason
PY

# the wheel reuses the editable build's objects (build/cuda-objects, build_cuda.OBJECTS_DIR): ninja
# only relinks
"$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$WHEEL_DIR" .
end=$(date +%s)
echo "build_cuda: wheel build took $((end - mid)) s; total $((end - start)) s"
ls -l "$WHEEL_DIR"/peer_attention-*.whl
