"""Builds the compiled extension dfkd_fast._C; all metadata lives in pyproject.toml.

The extension is compiled against the torch that is already installed, so install with
``pip install --no-build-isolation``: an isolated build would download a second torch.

Environment:
  DFKD_FAST_CUDA=1   build the CUDA kernels too (fails if torch has no CUDA or nvcc is missing)
  DFKD_FAST_CUDA=0   build the C++ CPU kernels only
  (unset)            build the CUDA kernels when torch has CUDA and nvcc is found
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_ENV_VAR = "DFKD_FAST_CUDA"


def _import_torch_build_tools():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "dfkd-fast compiles its extension against an installed torch, and none was found.\n"
            "Install torch first (for example `pip install torch==2.13.0`), then install this\n"
            "package with `pip install --no-build-isolation .` so that pip does not fetch\n"
            "another torch into an isolated build environment."
        )
    return torch, cpp_extension


def _want_cuda(torch, cpp_extension) -> bool:
    setting = os.environ.get(CUDA_ENV_VAR, "").strip()
    if setting not in ("", "0", "1"):
        sys.exit(f"{CUDA_ENV_VAR} must be 0, 1 or unset, got {setting!r}")
    torch_has_cuda = torch.version.cuda is not None
    nvcc_found = cpp_extension.CUDA_HOME is not None
    if setting == "1" and not (torch_has_cuda and nvcc_found):
        sys.exit(
            f"{CUDA_ENV_VAR}=1 but the CUDA kernels cannot be built here: "
            f"torch has CUDA: {torch_has_cuda}, nvcc found (CUDA_HOME): {nvcc_found}"
        )
    if setting == "0":
        return False
    return torch_has_cuda and nvcc_found


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    torch, cpp_extension = _import_torch_build_tools()
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if not _want_cuda(torch, cpp_extension):
        print("dfkd-fast: building the C++ CPU kernels only", flush=True)
        return cpp_extension.CppExtension(
            name="dfkd_fast._C",
            sources=sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        ), cpp_extension
    print("dfkd-fast: building the C++ CPU and the CUDA kernels", flush=True)
    return cpp_extension.CUDAExtension(
        name="dfkd_fast._C",
        sources=sources + _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"],
    ), cpp_extension


extension, cpp_extension = _extension()
setup(
    ext_modules=[extension],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
