#!/usr/bin/env bash
# CI: compile the Triton kernels for every architecture of SPEC section 13 (no GPU: Triton's own
# compiler and ptxas) and fail if a config the pruner may keep does not fit, traps, spills in a
# 16-bit kernel at head dim <= 128, or does not compile. Sampled (COMPILE_CHECK_SAMPLE tasks per
# architecture, every candidate config of each, the autotune-off one included;
# compile_check.HARDEST - fp32 dK/dV at head dim 256, bf16 dQ at 128 with a float mask, bf16 dK/dV
# at 128, the gated bf16 forward and dK/dV at 128 - always among them, the rest drawn per
# architecture with COMPILE_CHECK_SEED), two architectures at a time: 50-60 kernels per
# architecture, 1-2 minutes of CPU each with a cold Triton cache. The full sweep of one
# architecture (hours here):
#   python -m peer_attention.triton_kernels.compile_check --arch sm90a --jobs N
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
SAMPLE=${COMPILE_CHECK_SAMPLE:-6}
start=$(date +%s)
logs=$(mktemp -d)
status=0
run() {
    env -u TRITON_INTERPRET "$PY" -m peer_attention.triton_kernels.compile_check --arch "$1" \
        --sample "$SAMPLE" --seed "${COMPILE_CHECK_SEED:-0}" >"$logs/$1.log" 2>&1
}
for pair in "sm80 sm86" "sm89 sm90a" "sm100a sm120"; do
    pids=()
    for arch in $pair; do run "$arch" & pids+=($!); done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || status=1
    done
done
cat "$logs"/*.log
rm -rf "$logs"
echo "compile check took $(( $(date +%s) - start )) s (status $status)"
exit $status
