#!/usr/bin/env bash
# Compile-checks every plain CUDA kernel source csrc/cuda/*.cu with nvcc (no GPU and no torch
# needed: those files include no torch headers) for each architecture in SBP_CHECK_ARCHS
# (default "80 90": Ampere and Hopper). Objects go to a temporary directory that is removed.
# Finds nvcc on PATH, else in $CUDA_HOME/bin. Exits non-zero when nvcc is missing or any
# compilation fails. Usage: bash scripts/check_cuda_sources.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if command -v nvcc >/dev/null 2>&1; then
  nvcc="$(command -v nvcc)"
elif [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
  nvcc="${CUDA_HOME}/bin/nvcc"
else
  echo "check_cuda_sources: nvcc not found on PATH or in \$CUDA_HOME/bin" >&2
  exit 2
fi

shopt -s nullglob
sources=("$root"/csrc/cuda/*.cu)
if (( ${#sources[@]} == 0 )); then
  echo "check_cuda_sources: no csrc/cuda/*.cu files" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "check_cuda_sources: $("$nvcc" --version | tail -n 1)"
failed=0
for arch in ${SBP_CHECK_ARCHS:-80 90}; do
  for src in "${sources[@]}"; do
    name="$(basename "$src" .cu)"
    if "$nvcc" -c -std=c++17 -O3 -arch="sm_${arch}" -Xcompiler -Wall -I"$root/csrc/cuda" \
        "$src" -o "$tmp/${name}.sm_${arch}.o"; then
      echo "ok    sm_${arch}  csrc/cuda/${name}.cu"
    else
      echo "FAIL  sm_${arch}  csrc/cuda/${name}.cu" >&2
      failed=1
    fi
  done
done
exit "$failed"
