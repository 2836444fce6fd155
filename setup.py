"""Build bertkern._C: C++ CPU kernels always, CUDA kernels whenever a CUDA toolkit is found.

No GPU is needed or queried. Environment knobs:
  BERTKERN_CUDA=0/1        force the CUDA sources off/on (default: on when a toolkit is found)
  CUDA_HOME / CUDA_PATH    toolkit root (default: /usr/local/cuda when it has bin/nvcc)
  TORCH_CUDA_ARCH_LIST     target archs (default "8.0;9.0+PTX": sm_80, sm_90 and PTX)
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CONVENTIONAL_CUDA_ROOT = "/usr/local/cuda"


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


def want_cuda():
    flag = os.environ.get("BERTKERN_CUDA")
    cuda_home = find_cuda_home()
    if flag == "0":
        return None
    if flag == "1" and cuda_home is None:
        raise RuntimeError("BERTKERN_CUDA=1 but no CUDA toolkit found: set CUDA_HOME")
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
    # -fopenmp: at::parallel_for is inline OpenMP in ATen's headers; without it every CPU
    # kernel of the extension would run on one thread.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fvisibility=hidden"]
    link = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if CUDA_HOME is None:
        return [CppExtension("bertkern._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, extra_link_args=link)]
    nvcc = [
        "-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
        "-Xptxas=-v",  # register / spill report for every kernel, at build time
        "--threads=2",  # compile the archs in parallel
    ]
    return [CUDAExtension("bertkern._C", sources + rel("csrc/cuda/*.cu"), include_dirs=include_dirs,
                          define_macros=[("BERTKERN_WITH_CUDA", "1")],
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)]


setup(
    packages=find_packages(include=["bertkern", "bertkern.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
