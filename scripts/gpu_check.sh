#!/usr/bin/env bash
# The GPU check (issue 18): build, correctness (autotuning on where it matters), sanitizers and
# the headline numbers in ONE command that ends within 8 minutes of wall time on a lent H100/H200.
#
#   bash scripts/gpu_check.sh                      the whole plan (no arguments)
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh  the steps with their time boxes; exit 1 if the
#                                                  worst case exceeds the budget
#   GPU_CHECK_FAKE=1 bash scripts/gpu_check.sh     every step replaced by a quick fake
#                                                  (scripts/gpu_check_fake.py): the orchestration,
#                                                  time boxes and collected files, on any machine
#
# Each step runs under its own time box (`timeout`, SIGINT first so that pytest writes its XML and
# the bench its CSV), writes its results as it goes, and a step cut short leaves the others'.
# Steps not ordered against each other run at the same time (the build beside the Triton tests).
# Results go to $OUT when set (a lent machine returns at most 8 files of at most 16 MiB: the
# summary, env, steps, the bench CSV, a NOTES.md draft and one archive of the rest), else to the
# folder given as the first argument, else bench/results/<date>_<gpu>_<commit>/. The summary
# table is printed last; the exit status is 1 when a step failed or ran out of time.
#
# Environment: PYTHON (python3), GPU_CHECK_BUDGET (s, 480: the device call's limit),
# GPU_CHECK_RESERVE (s kept for the summary and the files, 20), GPU_CHECK_BOX_<STEP> (a step's
# box in s, e.g. GPU_CHECK_BOX_BENCH=200), GPU_CHECK_STEPS (a comma list: only those steps),
# GPU_CHECK_COMMIT (when the tree has no .git), MAX_JOBS (build jobs: all cores).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SELF=$ROOT/scripts/gpu_check.sh
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# The plan: name|runs after (steps that must have ended)|time box in s|what it does.
# Worst case (the boxes along the longest chain, plus the reserve) must fit GPU_CHECK_BUDGET. The
# chain build -> memcheck-cuda -> racecheck-cuda (220 s) sets the time before the bench; the steps
# beside it have boxes up to that.
PLAN=(
  "env||15|nvidia-smi, driver, nvcc, python, torch, CUDA, cuDNN, triton, compute-sanitizer, flash-attn"
  "prepare|env|15|peer_attention.triton_kernels importable from the tree; import check"
  "build|prepare|120|peer_attention._C for the visible GPU's arch only, MAX_JOBS = all cores (timed)"
  "triton-suite|prepare|180|tests/triton on CUDA tensors + tests/gpu Triton bottom-right/review cases, autotune off"
  "triton-autotune|prepare|210|tests/gpu SPEC-scale SDPA and peer (gates, biases, their backward) on Triton, autotune ON"
  "bench-warm|prepare|200|the bench's pa.triton and flex cases in parallel processes, autotune on, checked against float64 (fills the compile caches)"
  "memcheck-triton|prepare|90|compute-sanitizer memcheck, sanitize_workload.py --backend triton"
  "racecheck-triton|memcheck-triton|120|compute-sanitizer racecheck, sanitize_workload.py --backend triton"
  "cuda-tests|build|90|tests/cuda + tests/gpu on the CUDA kernels, the torch backend's CUDA tests"
  "memcheck-cuda|build|40|compute-sanitizer memcheck, sanitize_workload.py --backend cuda (every instantiation)"
  "racecheck-cuda|memcheck-cuda|60|compute-sanitizer racecheck, sanitize_workload.py --backend cuda"
  "bench|build,triton-suite,triton-autotune,bench-warm,racecheck-triton,cuda-tests,racecheck-cuda|180|python -m bench --preset gpucheck (alone on the GPU, autotune on)"
  "decode|bench|20|python -m bench --quick --suite decode (12 cases on a GPU)"
)
BUDGET=${GPU_CHECK_BUDGET:-480}
RESERVE=${GPU_CHECK_RESERVE:-20}

# the plan with GPU_CHECK_BOX_<STEP> overrides applied, and only the steps GPU_CHECK_STEPS names
# (a comma list; default all), e.g. a second run of what failed: GPU_CHECK_STEPS=env,prepare,
# build,cuda-tests. A step left out passes its own order on: what ran after it runs after the
# steps it ran after.
plan_lines() {
  local entry name after box what var dep deps selected=",${GPU_CHECK_STEPS:-},"
  local -A stands_for  # step -> the selected steps that stand for it (itself when selected)
  for entry in "${PLAN[@]}"; do
    IFS='|' read -r name after box what <<< "$entry"
    deps=""
    for dep in ${after//,/ }; do
      deps="$deps,${stands_for[$dep]}"
    done
    deps=$(echo "$deps" | tr ',' '\n' | awk 'NF && !seen[$0]++' | paste -sd, -)
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ "$selected" != *",$name,"* ]]; then
      stands_for[$name]=$deps
      continue
    fi
    stands_for[$name]=$name
    var=GPU_CHECK_BOX_$(echo "$name" | tr 'a-z-' 'A-Z_')
    echo "$name|$deps|${!var:-$box}|$what"
  done
}

# --- the steps (each runs as `gpu_check.sh --step NAME` under its time box) ------------------
# A step that cannot run here exits 200 after writing why into $DIR/NAME.skip.

skip() { echo "$*" > "$DIR/$STEP.skip"; echo "skipped: $*"; exit 200; }
have_extension() { ls peer_attention/_C*.so >/dev/null 2>&1; }
xdist() { "$PYTHON" -c "import xdist" 2>/dev/null && echo "-n $1"; }
pytest_step() {  # pytest_step WORKERS ARGS...: junit XML per step
  local workers=$1; shift
  # shellcheck disable=SC2046
  "$PYTHON" -m pytest -q -p no:cacheprovider $(xdist "$workers") --junitxml="$DIR/junit_$STEP.xml" "$@"
}
lower_priority() { renice -n 5 -p $$ > /dev/null 2>&1 || true; }  # for this step's processes
sanitize() {  # sanitize TOOL BACKEND
  command -v compute-sanitizer >/dev/null || skip "compute-sanitizer is not on PATH"
  [ "$2" = cuda ] && ! have_extension && skip "no peer_attention._C (see the build step)"
  # no caching allocator: memcheck then sees every out-of-bounds access of a tensor
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 PEER_ATTENTION_TRITON_AUTOTUNE=0 \
    compute-sanitizer --tool "$1" --error-exitcode 3 --log-file "$DIR/$STEP.sanitizer.log" \
    "$PYTHON" scripts/sanitize_workload.py --backend "$2"
}

step_env() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $COMMIT"
    echo "cores: $(nproc)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.max.sm \
      --format=csv 2>&1
    command -v nvcc >/dev/null && nvcc --version | tail -2
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -1
    "$PYTHON" - <<'PY' 2>&1
import importlib.util, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
for name in ("triton", "flash_attn", "xdist"):
    found = importlib.util.find_spec(name)
    version = getattr(__import__(name), "__version__", "") if found else ""
    print(f"{name}: {version or ('present' if found else 'not importable')}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
else:
    print("device: no CUDA device is visible")
PY
  } | tee "$DIR/env.txt"
}

step_prepare() {
  # the checkout that travels has no peer_attention/triton_kernels link (git ignores it)
  [ -e peer_attention/triton_kernels ] || ln -s ../triton_kernels peer_attention/triton_kernels
  "$PYTHON" -c "import peer_attention as pa, peer_attention.triton_kernels; print(pa.available_backends())"
}

step_build() {
  local start=$SECONDS
  MAX_JOBS=${MAX_JOBS:-$(nproc)} PEER_ATTENTION_BUILD_CUDA=1 \
    "$PYTHON" setup.py build_ext --inplace || return $?
  echo "build took $(( SECONDS - start )) s (MAX_JOBS=${MAX_JOBS:-$(nproc)}, archs: the visible GPU's)"
  "$PYTHON" -c "import peer_attention as pa; print(pa.available_backends())"
}

# the build (on the longest chain) goes first on the CPUs: the Triton lanes beside it are niced
step_triton_suite() {
  lower_priority
  PEER_ATTENTION_TEST_DEVICE=cuda PEER_ATTENTION_TRITON_AUTOTUNE=0 pytest_step 4 -k triton \
    tests/triton tests/gpu/test_spec_scale.py::test_bottom_right_causal \
    tests/gpu/test_spec_scale.py::test_many_batch_heads tests/gpu/test_spec_scale.py::test_memory_linear_in_tokens
}

step_triton_autotune() {
  PEER_ATTENTION_TRITON_AUTOTUNE=1 pytest_step 6 -k triton \
    tests/gpu/test_spec_scale.py::test_peer tests/gpu/test_spec_scale.py::test_sdpa
}

step_bench_warm() {
  # one process per pa.triton kernel variant (and flex's compiles), so that the compiles run in
  # parallel; their timings are thrown away (the GPU is shared here), their checks are kept
  lower_priority
  local pids=() i=0 spec
  for spec in "pa.triton|E=128/B" "pa.triton|causal=True" "pa.triton|S3," \
              "pa.triton|same work" "flex|L16384"; do
    PEER_ATTENTION_TRITON_AUTOTUNE=1 "$PYTHON" -m bench --preset gpucheck --no-plots \
      --provider "${spec%%|*}" --case "${spec#*|}" --out "$DIR/bench-warm/$i" \
      > "$DIR/bench-warm-$i.log" 2>&1 &
    pids+=($!)
    i=$(( i + 1 ))
  done
  local rc=0 pid
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  tail -n 3 "$DIR"/bench-warm-*.log
  return $rc
}

step_memcheck_triton() { sanitize memcheck triton; }
step_racecheck_triton() { sanitize racecheck triton; }
step_memcheck_cuda() { sanitize memcheck cuda; }
step_racecheck_cuda() { sanitize racecheck cuda; }

# tests/cuda files that only compile or emulate kernels on the host (nvcc, no GPU): CI runs them,
# the GPU's time box is for the kernels themselves
HOST_ONLY_CUDA_TESTS=(test_compile_report test_forward_spills test_dmask_columns test_forward_plain
                      test_fused_backward test_tile_copy)

step_cuda_tests() {
  have_extension || skip "no peer_attention._C (see the build step)"
  local ignore=() name
  for name in "${HOST_ONLY_CUDA_TESTS[@]}"; do ignore+=("--ignore=tests/cuda/$name.py"); done
  # with the `torch` backend's CUDA tests (torch's efficient-attention kernel under our plans)
  pytest_step 4 -k cuda "${ignore[@]}" tests/cuda tests/gpu tests/backends/test_torch_backend.py \
    tests/backends/test_torch_streams.py
}

step_bench() {
  PEER_ATTENTION_TRITON_AUTOTUNE=1 "$PYTHON" -m bench --preset gpucheck --out "$DIR/bench"
}

step_decode() {
  "$PYTHON" -c "import sys; from bench.cases import SUITES; sys.exit('decode' not in SUITES)" \
    || skip "bench/ has no decode suite yet (python -m bench --suite decode)"
  PEER_ATTENTION_TRITON_AUTOTUNE=1 "$PYTHON" -m bench --quick --suite decode --dtype bfloat16 --no-plots \
    --out "$DIR/decode"
}

if [ "${1:-}" = "--step" ]; then  # internal: one step, under the time box its caller set
  STEP=$2
  if [ "${GPU_CHECK_FAKE:-0}" = 1 ]; then
    exec "$PYTHON" scripts/gpu_check_fake.py "$STEP" "$DIR"
  fi
  "step_${STEP//-/_}"
  exit $?
fi

case "${1:-}" in
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SELF"; exit 0 ;;
esac

# --- the plan's budget ----------------------------------------------------------------------
if ! plan_lines | "$PYTHON" scripts/gpu_check_report.py plan "$BUDGET" "$RESERVE"; then
  echo "gpu_check: the plan does not fit the ${BUDGET} s budget" >&2
  exit 1
fi
[ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] && exit 0

# --- the run --------------------------------------------------------------------------------
COMMIT=${GPU_CHECK_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
RESULTS=""
if [ -n "${OUT:-}" ]; then
  # the steps write into a work folder; after each step its files are packed into $OUT (at most
  # 8 files), so that a run stopped from outside still returns what it had
  DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
  RESULTS=$OUT
elif [ -n "${1:-}" ]; then
  DIR=$1
else
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  DIR=bench/results/$("$PYTHON" scripts/gpu_check_report.py name "${gpu:-unknown GPU}" "$COMMIT")
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
export DIR COMMIT PYTHON
: > "$DIR/steps.tsv"
START=$SECONDS
DEADLINE=$(( BUDGET - RESERVE ))
echo "gpu_check: results in ${RESULTS:-$DIR}; ends within ${BUDGET} s"

declare -A STATE PID BOX AFTER BEGAN
NAMES=()
while IFS='|' read -r name after box _; do
  NAMES+=("$name"); STATE[$name]=pending; AFTER[$name]=$after; BOX[$name]=$box
done < <(plan_lines)
plan_lines > "$DIR/plan.txt"  # the summary lists the steps in this order

record() {  # record NAME RC SECONDS BOX NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$DIR/steps.tsv"
}

# run_step NAME: the step under min(its box, the time left), its output in DIR/NAME.log
run_step() {
  local name=$1 box=${BOX[$1]} left rc note=""
  left=$(( DEADLINE - (SECONDS - START) ))
  if [ "$left" -lt 5 ]; then
    record "$name" skip 0 "$box" "no time left before the ${DEADLINE} s deadline"
    return
  fi
  [ "$box" -gt "$left" ] && box=$left && note="box cut to the $left s left"
  local began=$SECONDS
  timeout -s INT --kill-after=5 "$box" bash "$SELF" --step "$name" > "$DIR/$name.log" 2>&1
  rc=$?
  if [ "$rc" = 200 ] && [ -f "$DIR/$name.skip" ]; then
    rc=skip; note=$(cat "$DIR/$name.skip"); rm -f "$DIR/$name.skip"
  fi
  record "$name" "$rc" "$(( SECONDS - began ))" "$box" "$note"
  echo "== $name: $( [ "$rc" = 0 ] && echo ok || echo "$rc" ) after $(( SECONDS - began )) s (box $box s)"
}

snapshot() {  # the summary so far, packed into $OUT
  "$PYTHON" scripts/gpu_check_report.py summary "$DIR" > /dev/null
  [ -z "$RESULTS" ] || "$PYTHON" scripts/gpu_check_report.py collect "$DIR" "$RESULTS" > /dev/null
}

ready() {  # every step NAME runs after has ended
  local dep
  for dep in ${AFTER[$1]//,/ }; do
    [ "${STATE[$dep]}" = done ] || return 1
  done
}

while :; do
  active=0
  for name in "${NAMES[@]}"; do
    case "${STATE[$name]}" in
      pending)
        active=1
        if ready "$name"; then
          echo "== $name: started at $(( SECONDS - START )) s"
          run_step "$name" &
          PID[$name]=$!; STATE[$name]=running; BEGAN[$name]=$SECONDS
        fi ;;
      running)
        active=1
        if ! kill -0 "${PID[$name]}" 2>/dev/null; then
          wait "${PID[$name]}"; STATE[$name]=done
          snapshot
        fi ;;
    esac
  done
  [ "$active" = 0 ] && break
  sleep 0.3
done

echo
echo "gpu_check: the steps took $(( SECONDS - START )) s"
"$PYTHON" scripts/gpu_check_report.py notes "$DIR" > /dev/null
SUMMARY=$("$PYTHON" scripts/gpu_check_report.py summary "$DIR")
NAME=$("$PYTHON" scripts/gpu_check_report.py name \
  "$(sed -n 's/^device: \([^,]*\),.*/\1/p' "$DIR/env.txt" 2>/dev/null | head -1)" "$COMMIT")
failed=$(awk -F'\t' '$2 != "0" && $2 != "skip"' "$DIR/steps.tsv" | wc -l)
if [ -n "$RESULTS" ]; then
  echo "files in \$OUT: $("$PYTHON" scripts/gpu_check_report.py collect "$DIR" "$RESULTS")"
  rm -rf "$DIR"
fi
echo "commit the results as bench/results/$NAME/ (see bench/README.md, 'The GPU check'); took $(( SECONDS - START )) s"
echo
echo "$SUMMARY"
exit $(( failed > 0 ? 1 : 0 ))
