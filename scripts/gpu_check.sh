#!/usr/bin/env bash
# One-command GPU check (issue 10): build, test, sanitize and benchmark on a CUDA machine.
#
#   scripts/gpu_check.sh test       environment, timed build of peer_attention._C for the visible
#                                   GPU (all cores), the whole test suite on the GPU (Triton with
#                                   its real compiler, tests/cuda, tests/gpu at GPU-scale shapes)
#                                   with Triton autotuning off (one config per kernel)
#   scripts/gpu_check.sh sanitize   compute-sanitizer memcheck, racecheck, synccheck, initcheck over
#                                   scripts/sanitize_workload.py (every CUDA kernel; the Triton
#                                   kernels forward and backward with each feature)
#   scripts/gpu_check.sh bench      python -m bench --preset headline (autotuning on)
#   scripts/gpu_check.sh all        test, sanitize, bench
# Several may be named: `scripts/gpu_check.sh test sanitize` (one 9-minute command on an H100),
# then `scripts/gpu_check.sh bench` (another).
#
# Results (logs, junit XML, sanitizer logs, bench CSV/JSON/plots, summary.txt) go to $OUT when it
# is set, else bench/results/<date>_<gpu>_<commit>/. With $OUT set and GPU_CHECK_PACK=1 (the
# default there) everything but summary.txt and env.txt is packed into gpu_check.tar.gz, since
# only a few files come back from a lent machine. A summary table is printed last.
#
# Environment: PYTHON (default python3), MAX_JOBS (default: all cores), TORCH_CUDA_ARCH_LIST
# (default: the visible GPU's), PEER_ATTENTION_GPU_TIER (1 default, 2 = more tests/gpu cases),
# GPU_CHECK_COMMIT (the commit to name when the tree has no .git), GPU_CHECK_DEADLINE (s for the
# whole call: 540, or 1080 for bench after test/sanitize), GPU_CHECK_TEST_TIMEOUT (s, 240),
# GPU_CHECK_SANITIZE_TIMEOUT (s per tool, 75), GPU_CHECK_BENCH_TIMEOUT (s, 540),
# GPU_CHECK_TEST_WORKERS (pytest-xdist workers, 8), GPU_CHECK_DRY_RUN=1 (print the steps only).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'
}

COMMANDS=()
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    test|sanitize|bench) COMMANDS+=("$arg") ;;
    all) COMMANDS+=(test sanitize bench) ;;
    *) echo "gpu_check.sh: unknown command '$arg' (expected test, sanitize, bench or all)" >&2
       usage >&2; exit 2 ;;
  esac
done
if [ ${#COMMANDS[@]} -eq 0 ]; then
  echo "gpu_check.sh: name a command: test, sanitize, bench or all" >&2
  usage >&2
  exit 2
fi

PYTHON=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-240}
SANITIZE_TIMEOUT=${GPU_CHECK_SANITIZE_TIMEOUT:-75}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-540}
export PYTHONUNBUFFERED=1

gpu_name() {
  if [ "$DRY" = 1 ] || ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "${GPU_CHECK_GPU_NAME:-unknown GPU}"
  else
    nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1
  fi
}
COMMIT=${GPU_CHECK_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
if [ -n "${OUT:-}" ]; then
  DIR=$OUT
else
  DIR=bench/results/$("$PYTHON" scripts/gpu_check_report.py name "$(gpu_name)" "$COMMIT")
fi
mkdir -p "$DIR"
: > "$DIR/steps.tsv"
echo "gpu_check: ${COMMANDS[*]} -> $DIR"

# The whole invocation has a deadline (GPU_CHECK_DEADLINE seconds; default 540, one lent-machine
# command, or 1080 when bench runs after test/sanitize): a step gets at most what is left.
START=$(date +%s)
if [ -z "${GPU_CHECK_DEADLINE:-}" ]; then
  GPU_CHECK_DEADLINE=540
  [[ " ${COMMANDS[*]} " == *" bench "* && "${COMMANDS[*]}" != "bench" ]] && GPU_CHECK_DEADLINE=1080
fi
time_left() { echo $(( GPU_CHECK_DEADLINE - ($(date +%s) - START) - 15 )); }

# run_step NAME LOG TIMEOUT CMD...: run CMD with its output in LOG (and the terminal's tail) under
# min(TIMEOUT, time left), record its exit status and seconds in steps.tsv. SIGINT first, so that
# pytest still writes its junit XML and the bench its JSON.
run_step() {
  local name=$1 log=$2 limit=$3
  shift 3
  if [ "$DRY" = 1 ]; then
    echo "[dry run] $name (autotune=${PEER_ATTENTION_TRITON_AUTOTUNE:-default}): $*"
    printf '%s\t0\t0\tdry run\n' "$name" >> "$DIR/steps.tsv"
    return 0
  fi
  local left
  left=$(time_left)
  if [ "$left" -lt 10 ]; then
    echo "== $name: skipped, the ${GPU_CHECK_DEADLINE} s deadline is reached"
    printf '%s\tskip\t0\tno time left before the %s s deadline\n' "$name" "$GPU_CHECK_DEADLINE" >> "$DIR/steps.tsv"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s): $*"
  local start rc
  start=$(date +%s)
  timeout -s INT --kill-after=30 "$limit" "$@" > "$DIR/$log" 2>&1
  rc=$?
  tail -n 5 "$DIR/$log"
  printf '%s\t%s\t%s\t\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$DIR/steps.tsv"
  return $rc
}

print_environment() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $COMMIT"
    echo "cores: $(nproc)"
    if [ "$DRY" != 1 ]; then
      nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
      command -v nvcc >/dev/null && nvcc --version | tail -2
      "$PYTHON" - <<'PY' 2>&1
import sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
else:
    print("device: no CUDA device is visible")
PY
      command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -1
    fi
  } | tee "$DIR/env.txt"
}

# The extension and the editable install (peer_attention.triton_kernels is mapped by setup.py):
# rebuilt unless both import and the extension is newer than every csrc/ file.
BUILT=0
ensure_built() {
  [ "$BUILT" = 1 ] && return 0
  BUILT=1
  if [ "$DRY" != 1 ]; then
    local so
    so=$(ls peer_attention/_C*.so 2>/dev/null | head -1)
    if [ -n "$so" ] && [ -z "$(find csrc -newer "$so" -type f | head -1)" ] \
        && (cd / && "$PYTHON" -c "import peer_attention._C, peer_attention.triton_kernels") 2>/dev/null; then
      printf 'build\t0\t0\treused %s\n' "$so" >> "$DIR/steps.tsv"
      return 0
    fi
  fi
  MAX_JOBS=${MAX_JOBS:-$(nproc)} PEER_ATTENTION_BUILD_CUDA=1 run_step build build.log 900 \
    "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation -e .
}

do_test() {
  ensure_built || echo "gpu_check: the build failed; the tests run without the extension"
  local parallel=()
  if "$PYTHON" -c "import xdist" 2>/dev/null; then
    parallel=(-n "${GPU_CHECK_TEST_WORKERS:-8}")
  fi
  PEER_ATTENTION_TRITON_AUTOTUNE=0 run_step tests tests.log "$TEST_TIMEOUT" \
    "$PYTHON" -m pytest -q -p no:cacheprovider "${parallel[@]}" --junitxml="$DIR/junit_tests.xml" tests
}

do_sanitize() {
  ensure_built || echo "gpu_check: the build failed; the sanitizers see the Triton kernels only"
  if [ "$DRY" != 1 ] && ! command -v compute-sanitizer >/dev/null 2>&1; then
    printf 'sanitize\t127\t0\tcompute-sanitizer is not on PATH\n' >> "$DIR/steps.tsv"
    return 1
  fi
  local tool steps=4 share
  for tool in memcheck racecheck synccheck initcheck; do
    share=$(( $(time_left) / steps ))
    steps=$(( steps - 1 ))
    [ "$share" -gt "$SANITIZE_TIMEOUT" ] && share=$SANITIZE_TIMEOUT
    # no caching allocator: memcheck then sees every out-of-bounds access of a tensor
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 PEER_ATTENTION_TRITON_AUTOTUNE=0 \
      run_step "sanitize $tool" "sanitize_${tool}.out" "$share" \
      compute-sanitizer --tool "$tool" --error-exitcode 3 --log-file "$DIR/sanitize_${tool}.log" \
      "$PYTHON" scripts/sanitize_workload.py --backend all
  done
}

do_bench() {
  ensure_built || echo "gpu_check: the build failed; pa.cuda will be unavailable"
  PEER_ATTENTION_TRITON_AUTOTUNE=1 run_step "bench headline" bench.log "$BENCH_TIMEOUT" \
    "$PYTHON" -m bench --preset headline --out "$DIR/bench"
}

print_environment
for command in "${COMMANDS[@]}"; do
  "do_$command"
done

echo
NAME=$("$PYTHON" scripts/gpu_check_report.py name "$(gpu_name)" "$COMMIT")
SUMMARY=$("$PYTHON" scripts/gpu_check_report.py summary "$DIR")
if [ -n "${OUT:-}" ] && [ "${GPU_CHECK_PACK:-1}" = 1 ] && [ "$DRY" != 1 ]; then
  # a lent machine returns only a few files: everything else goes into one archive
  (cd "$DIR" && tar czf /tmp/gpu_check.tar.gz --exclude=summary.txt --exclude=env.txt \
     --exclude=steps.tsv . && find . -mindepth 1 ! -name env.txt ! -name summary.txt \
     ! -name steps.tsv -delete && mv /tmp/gpu_check.tar.gz .)
fi
echo "gpu_check: ${COMMANDS[*]} took $(( $(date +%s) - START )) s; results in $DIR (commit them under bench/results/$NAME/ with a NOTES.md)"
echo "$SUMMARY"
FAILED=$(awk -F'\t' '$2 != "0" && $2 != "skip"' "$DIR/steps.tsv" | wc -l)
exit $(( FAILED > 0 ? 1 : 0 ))
