#!/usr/bin/env bash
# The whole GPU check in ONE call of at most 8 minutes on an H100 / H200 (a lent machine runs one
# command for at most 10 minutes and brings back at most 8 files): build the CUDA extension for
# sm_90 only, run the benchmark CLI at the target shapes and the whole models, then the GPU tests
# with one config per Triton kernel (tests/conftest.py sets SBP_TRITON_AUTOTUNE=0 on a GPU).
# Everything goes to $OUT (default /tmp/sbp-gpu), exactly these 8 files:
#   env.txt     device, driver, torch / CUDA / Triton versions, commit and date
#   build.log   pip install -e . (TORCH_CUDA_ARCH_LIST, default 9.0)
#   bench.log, bench.json, bench.md, bench.png   sbp-bench (default keep ratio 0.5)
#   tests.log, tests.xml                           pytest on the test files that use the GPU
#
#   scripts/gpu_check.sh [env] [build] [bench] [tests] [wheel]
#
# Stages run in the order given (default: env build bench tests). The benchmark runs before the
# tests because it only writes its JSON / markdown / PNG when it finishes, and it checks every
# backward it times against torch; the tests take whatever time is left and, stopped by SIGINT at
# the deadline, still write their report. `wheel` (scripts/build_wheels.sh --test) is not part of
# the default run: it adds files and minutes.
# Environment: PYTHON (default python3); BUDGET, seconds for the whole call (default 470);
# BUILD_TIMEOUT / BENCH_TIMEOUT, the caps of those stages (default 150 / 170); BENCH_ARGS (default
# "--ratios 0.5"); TORCH_CUDA_ARCH_LIST (default 9.0); MAX_JOBS (default 16); TEST_WORKERS, pytest
# processes compiling Triton kernels side by side (default 8, needs pytest-xdist).
# Python packages the machine lacks (expecttest, which torch.library.opcheck needs) can be put as
# wheels in .whl/ of the checkout; they are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/sbp-gpu}"
py="${PYTHON:-python3}"
mkdir -p "$out"
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(env build bench tests)
end=$((SECONDS + ${BUDGET:-470}))
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

run() {  # run STAGE LOG CAP COMMAND...: at most CAP seconds (and never past the deadline), logs to
  # $out/LOG; SIGINT first, so pytest still writes its report; remembers a failure, goes on
  local stage=$1 log=$2 cap=$3
  shift 3
  local left=$((end - SECONDS))
  ((cap < left)) || cap=$left
  if ((cap < 10)); then
    echo "== $stage: skipped, the call's time budget is spent" | tee "$out/$log"
    status=1
    return
  fi
  echo "== $stage (at most $cap s)"
  local start=$SECONDS
  timeout -s INT -k 15 "$cap" "$@" >"$out/$log" 2>&1
  local rc=$?
  tail -n 15 "$out/$log"
  echo "== $stage: exit $rc after $((SECONDS - start)) s"
  [ $rc -eq 0 ] || status=1
}

gpu_tests=(tests/test_triton_linear.py tests/test_triton_mlp.py tests/test_triton_attention.py
           tests/test_triton_cross_entropy.py tests/test_cuda_backend.py tests/test_attention.py tests/test_opcheck.py
           tests/test_bad_input.py tests/test_cuda_graphs.py tests/test_triton_library.py
           tests/test_extension.py)
workers=()
"$py" -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-8}")

for stage in "${stages[@]}"; do
  case "$stage" in
    env)
      run env env.txt 60 bash -c "date -u; nvidia-smi; git log -1 --format='commit %H %cd' 2>/dev/null; $py -c '
import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))'" ;;
    build)
      run build build.log "${BUILD_TIMEOUT:-150}" env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
        MAX_JOBS="${MAX_JOBS:-16}" "$py" -m pip install --no-build-isolation --no-deps -v -e . ;;
    bench)
      # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
      run bench bench.log "${BENCH_TIMEOUT:-170}" "$py" -m sbp_kernels.bench ${BENCH_ARGS:---ratios 0.5} \
        --json "$out/bench.json" --markdown "$out/bench.md" --plot "$out/bench.png" ;;
    tests)
      run tests tests.log $((end - SECONDS)) env SBP_REQUIRE_EXTENSION=1 "$py" -m pytest "${gpu_tests[@]}" -q -rs \
        "${workers[@]}" --junitxml="$out/tests.xml" ;;
    wheel)
      run wheel wheel.log $((end - SECONDS)) env PYTHON="$py" bash scripts/build_wheels.sh --test --outdir "$out" ;;
    *) echo "gpu_check: unknown stage $stage" >&2; exit 2 ;;
  esac
done
exit $status
