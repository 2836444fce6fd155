"""Build bertkern._C: C++ CPU kernels always, CUDA kernels whenever a CUDA toolkit is found.

No GPU is needed or queried. Environment knobs:
  BERTKERN_CUDA=0/1        force the CUDA sources off/on (default: on when a toolkit is found
                           and the installed torch is a CUDA build)
  CUDA_HOME / CUDA_PATH    toolkit root (default: /usr/local/cuda when it has bin/nvcc)
  TORCH_CUDA_ARCH_LIST     target archs (default "8.0;9.0+PTX": sm_80, sm_90 and PTX)
  MAX_JOBS                 parallel compile jobs (ninja)

The extension uses only the LibTorch stable ABI (csrc/torch_api.h) and Python's limited API, so
one build loads in every torch >= TORCH_TARGET (below) and every CPython >= 3.10: it is built
against whatever torch is installed (pip install --no-build-isolation) and never needs the exact
torch it will run with.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CONVENTIONAL_CUDA_ROOT = "/usr/local/cuda"
# Oldest torch whose stable ABI the extension targets: the headers hide every newer API, so
# building against a newer torch still yields a library that loads in this one.
TORCH_TARGET = (2, 10)
PY_LIMITED_API = "0x030A0000"  # CPython 3.10


def find_cuda_home():
    """The toolkit root, found without a GPU; None when there is no toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if os.path.exists(os.path.join(CONVENTIONAL_CUDA_ROOT, "bin", "nvcc")):
        return CONVENTIONAL_CUDA_ROOT
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc on PATH may be a wrapper script in a generic bin folder (/usr/local/bin), whose
        # parent is not a toolkit; only trust a parent that has the runtime library.
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if glob.glob(os.path.join(root, "lib*", "libcudart.so*")):
            return root
    return None


def torch_has_cuda():
    """Whether the installed torch is a CUDA build: the CUDA kernels link its libtorch_cuda.
    (Importing torch does not import torch.utils.cpp_extension, which reads CUDA_HOME.)"""
    import torch

    return torch.version.cuda is not None


def want_cuda():
    flag = os.environ.get("BERTKERN_CUDA")
    cuda_home = find_cuda_home()
    if flag == "0":
        return None
    if flag == "1" and cuda_home is None:
        raise RuntimeError("BERTKERN_CUDA=1 but no CUDA toolkit found: set CUDA_HOME")
    if not torch_has_cuda():
        if flag == "1":
            raise RuntimeError("BERTKERN_CUDA=1 but the installed torch is a CPU-only build")
        return None  # a CPU-only torch: the CUDA kernels would have no libtorch_cuda to load
    return cuda_home


CUDA_HOME = want_cuda()
if CUDA_HOME is not None:
    # torch.utils.cpp_extension reads these at import time.
    os.environ["CUDA_HOME"] = CUDA_HOME
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def extensions():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
    # No -fopenmp: the CPU kernels run on libtorch's thread pool through the stable ABI.
    # -fopenmp-simd keeps the kernels' `#pragma omp simd` loops vectorized, with no OpenMP runtime.
    stable = [f"-DTORCH_TARGET_VERSION=0x{TORCH_TARGET[0]:02X}{TORCH_TARGET[1]:02X}000000000000",
              f"-DPy_LIMITED_API={PY_LIMITED_API}"]
    cxx = ["-O3", "-std=c++20", "-fopenmp-simd", "-fvisibility=hidden"] + stable
    include_dirs = [os.path.join(ROOT, "csrc")]
    if CUDA_HOME is None:
        return [CppExtension("bertkern._C", sources, include_dirs=include_dirs, py_limited_api=True,
                             extra_compile_args={"cxx": cxx})]
    nvcc = [
        "-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
        "-Xptxas=-v",  # register / spill report for every kernel, at build time
        "--threads=2",  # compile the archs in parallel
    ] + stable
    return [CUDAExtension("bertkern._C", sources + rel("csrc/cuda/*.cu"), include_dirs=include_dirs,
                          py_limited_api=True,
                          # USE_CUDA: the stable C shim's CUDA entry points (current stream)
                          define_macros=[("BERTKERN_WITH_CUDA", "1"), ("USE_CUDA", "1")],
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc})]


setup(
    packages=find_packages(include=["bertkern", "bertkern.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},  # one wheel: cp310-abi3
)
