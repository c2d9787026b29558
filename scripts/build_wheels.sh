#!/usr/bin/env bash
# Builds a wheel of sbp_kernels against the torch already installed (python -m build --wheel
# --no-isolation), and with --test installs it into a fresh venv and runs the test suite from
# outside the source tree against the installed wheel.
#
#   scripts/build_wheels.sh [--test] [--outdir DIR] [--python PY]
#
# - With a CUDA build of torch and nvcc present, setup.py compiles the CUDA kernels for
#   TORCH_CUDA_ARCH_LIST (default here "8.0;9.0+PTX": A100, H100/H200, PTX for newer GPUs) and
#   gives the wheel a local version tag naming CUDA and torch (e.g. 0.1.0+cu128torch2.11).
#   Otherwise (or with SBP_BUILD_CUDA=0) it builds a CPU wheel (C++ CPU kernels only).
# - The build runs in a temporary copy of the working tree (git's tracked and untracked,
#   not-ignored files), so it neither races other builds in build/ nor leaves files behind.
# - --test: the venv is made with --system-site-packages so it reuses the installed torch. When PY
#   itself runs inside a venv, that venv's site-packages are added to the new one with a .pth
#   file (plain paths: the parent's .pth hooks, such as an editable install of sbp_kernels, do not
#   run), so `import sbp_kernels` finds the wheel, checked before the tests start.
# Environment: PYTHON (default: python, or python3), MAX_JOBS (default: number of CPUs).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$(command -v python || command -v python3)}"
outdir="$root/dist"
run_tests=0

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
  case "$1" in
    --test) run_tests=1 ;;
    --outdir) outdir="$2"; shift ;;
    --outdir=*) outdir="${1#*=}" ;;
    --python) py="$2"; shift ;;
    --python=*) py="${1#*=}" ;;
    -h | --help) usage; exit 0 ;;
    *) echo "build_wheels: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"

if ! "$py" -c "import torch, build, setuptools, wheel" 2>/dev/null; then
  echo "build_wheels: $py needs torch, build, setuptools and wheel (pip install build setuptools wheel ninja)" >&2
  exit 2
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
"$py" - <<'EOF'
import os, torch
from torch.utils.cpp_extension import CUDA_HOME
cuda = os.environ.get("SBP_BUILD_CUDA", "1") != "0" and torch.version.cuda is not None and CUDA_HOME is not None
what = f"CUDA {torch.version.cuda} kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}" if cuda else "CPU only"
print(f"build_wheels: torch {torch.__version__}, building {what}")
EOF

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$root" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [[ -f "$f" ]] && printf '%s\0' "$f"; done \
    | tar -c --null -T - -f -) | tar -x -C "$work/src"
else
  (cd "$root" && tar -c --exclude=./build --exclude=./dist --exclude=./.git --exclude='*.so' \
    --exclude='*.egg-info' -f - .) | tar -x -C "$work/src"
fi

stamp="$work/stamp"
touch "$stamp"
(cd "$work/src" && "$py" -m build --wheel --no-isolation --outdir "$outdir")
wheel="$(find "$outdir" -maxdepth 1 -name 'sbp_kernels-*.whl' -newer "$stamp" | head -n 1)"
if [[ -z "$wheel" ]]; then
  echo "build_wheels: no new sbp_kernels wheel in $outdir" >&2
  exit 1
fi
echo "build_wheels: built $wheel"
((run_tests)) || exit 0

venv="$work/venv"
"$py" -m venv --system-site-packages "$venv"
site_dir="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$py" -c 'import site, sys
if sys.prefix != sys.base_prefix:
    print("\n".join(site.getsitepackages()))' >"$site_dir/_sbp_parent_site.pth"
"$venv/bin/python" -m pip install -q --no-deps --no-index --ignore-installed "$wheel"

# Run from a directory holding only a copy of tests/, so nothing imports the source tree.
mkdir "$work/run"
cp -r "$root/tests" "$work/run/tests"
cd "$work/run"
"$venv/bin/python" - "$venv" <<'EOF'
import sys
import sbp_kernels
print(f"build_wheels: testing {sbp_kernels.__file__} (backends: {sbp_kernels.backends()})")
if not sbp_kernels.__file__.startswith(sys.argv[1]):
    sys.exit("build_wheels: sbp_kernels was not imported from the installed wheel")
EOF
"$venv/bin/python" -m pytest tests -q -p no:cacheprovider
echo "build_wheels: tests passed against $(basename "$wheel")"
