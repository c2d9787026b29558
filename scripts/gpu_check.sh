#!/usr/bin/env bash
# One batched run on a GPU machine: build the CUDA extension in place, run the test suite on the
# GPU, run the benchmarks, build and test the wheel. Logs and results go to $OUT (default
# /tmp/sbp-gpu); stages run in the order given (default: env build tests bench).
#
#   scripts/gpu_check.sh [env] [build] [tests] [bench] [wheel]
#
# Python packages the machine lacks (expecttest, which torch.library.opcheck needs) can be put as
# wheels in .whl/ of the checkout; they are installed to /tmp/site first.
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default "9.0": the H100 / H200),
# MAX_JOBS (default 16), TEST_TIMEOUT / BENCH_TIMEOUT in seconds (default 480 / 540).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/sbp-gpu}"
py="${PYTHON:-python3}"
mkdir -p "$out"
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(env build tests bench)
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

run() {  # run STAGE LOG COMMAND...: logs to $out/LOG, remembers a failure, goes on
  local stage=$1 log=$2
  shift 2
  echo "== $stage"
  "$@" >"$out/$log" 2>&1
  local rc=$?
  tail -n 15 "$out/$log"
  echo "== $stage: exit $rc"
  [ $rc -eq 0 ] || status=1
}

for stage in "${stages[@]}"; do
  case "$stage" in
    env)
      run env env.txt bash -c "nvidia-smi; git log -1 --format='commit %H %cd' 2>/dev/null; $py -c '
import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))'" ;;
    build)
      run build build.log env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
        "$py" -m pip install --no-build-isolation --no-deps -v -e . ;;
    tests)
      run tests tests.log env SBP_REQUIRE_EXTENSION=1 timeout "${TEST_TIMEOUT:-480}" \
        "$py" -m pytest tests -q -rs --junitxml="$out/tests.xml" ;;
    bench)
      run bench bench.log timeout "${BENCH_TIMEOUT:-540}" "$py" -m sbp_kernels.bench \
        --json "$out/bench.json" --markdown "$out/bench.md" --plot "$out/bench.png" ;;
    wheel)
      run wheel wheel.log env PYTHON="$py" bash scripts/build_wheels.sh --test --outdir "$out" ;;
    *) echo "gpu_check: unknown stage $stage" >&2; exit 2 ;;
  esac
done
exit $status
