#!/usr/bin/env bash
# CI: compile the Triton kernels for every architecture of SPEC section 13 (no GPU: Triton's own
# compiler and ptxas) and fail if a config the pruner may keep does not fit, traps, spills in a
# 16-bit kernel at head dim <= 128, or does not compile.
#
# Every candidate config of every task (kernel x dtype x head dim x family, 360 tasks and about
# 3,000 configs per architecture) is checked; compiling them all takes hours on two cores, so:
# - COMPILE_CHECK_SAMPLE tasks per architecture are compiled here, every candidate of each
#   (compile_check.HARDEST - fp32 dK/dV at head dim 256, bf16 dQ at 128 with a float mask, bf16
#   dK/dV at 128, the gated bf16 forward and dK/dV at 128 - always among them, the rest drawn
#   per architecture with COMPILE_CHECK_SEED), and where the compile ledger has their rows, a
#   compile that differs from its row fails;
# - where the architecture has a ledger (.ci/compile_ledger/smNN.tsv: rows keyed by Triton's own
#   compile cache key, triton_kernels/ledger.py), every other task is checked from its rows by
#   the same rules, and a task it does not cover (a kernel, a candidate list or Triton changed
#   since it was written) fails: refresh it with
#     python -m peer_attention.triton_kernels.compile_check --arch sm90a \
#         --ledger .ci/compile_ledger --update-ledger --jobs N
#   (only the compiles whose key changed are compiled again);
# - where it has none, only the sample is checked.
# Two architectures at a time: 50-60 compiles per architecture, 1-2 minutes of CPU each with a
# cold Triton cache, a few seconds for the ledger's tasks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
SAMPLE=${COMPILE_CHECK_SAMPLE:-6}
LEDGER=.ci/compile_ledger
start=$(date +%s)
logs=$(mktemp -d)
status=0
run() {
    local ledger=()
    if [ -e "$LEDGER/sm${1//[!0-9]/}.tsv" ]; then ledger=(--ledger "$LEDGER" --require-ledger); fi
    env -u TRITON_INTERPRET "$PY" -m peer_attention.triton_kernels.compile_check --arch "$1" \
        --sample "$SAMPLE" --seed "${COMPILE_CHECK_SEED:-0}" "${ledger[@]}" >"$logs/$1.log" 2>&1
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
