"""Builds sbp_kernels._C: the `sbp` op schemas and the C++ CPU kernels, plus the CUDA kernels when
a CUDA build of torch and nvcc are present (set SBP_BUILD_CUDA=0 to skip them).

Build against the torch already installed: `pip install --no-build-isolation .` (an isolated
build environment would download another, multi-GB torch and the .so would not match yours).
"""
import glob
import os

from setuptools import setup

VERSION = "0.1.0"


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = os.environ.get("SBP_BUILD_CUDA", "1") != "0" and torch.version.cuda is not None
    # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there (/usr/local/bin/nvcc)
    # gives a folder without the toolkit's headers. Build the CUDA kernels only with a real toolkit.
    if with_cuda and not (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h"))):
        print(
            f"sbp_kernels: no CUDA toolkit headers under CUDA_HOME={CUDA_HOME!r}: building the C++ CPU "
            "kernels only (set CUDA_HOME to the toolkit, e.g. /usr/local/cuda, for the CUDA kernels)"
        )
        with_cuda = False
    # Kernels compiled for Ampere and Hopper plus PTX for newer GPUs unless told otherwise.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    macros = [("SBP_TORCH_VERSION", f'"{torch.__version__}"')]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        macros.append(("SBP_WITH_CUDA", None))
        ext = CUDAExtension(
            "sbp_kernels._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        )
    else:
        ext = CppExtension("sbp_kernels._C", sources, define_macros=macros, extra_compile_args=["-O3"])
    # A wheel with CUDA kernels only runs on the torch and CUDA it was built against: say so in the
    # local version tag (e.g. 0.1.0+cu130torch2.11); a CPU build keeps the plain version.
    version = VERSION
    if with_cuda:
        torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
        version += f"+cu{torch.version.cuda.replace('.', '')}torch{torch_mm}"
    return [ext], {"build_ext": BuildExtension}, version


ext_modules, cmdclass, version = _extensions()
setup(version=version, ext_modules=ext_modules, cmdclass=cmdclass)
