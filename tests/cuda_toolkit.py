"""Locating nvcc for tests that compile CUDA sources without a GPU (the same search as setup.py)."""
import glob
import os
import shutil
import sysconfig


def cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if glob.glob(os.path.join(root, "lib*", "libcudart.so*")):
            return root
    return None


# The macros setup.py defines for the CUDA sources: the stable-ABI target (torch 2.10; setup.py:
# TORCH_TARGET), USE_CUDA (the stable C shim declares its CUDA entry points under it) and
# BERTKERN_WITH_CUDA.
DEFINES = ["-DTORCH_TARGET_VERSION=0x020A000000000000", "-DUSE_CUDA=1", "-DBERTKERN_WITH_CUDA=1"]


def nvcc_command(source, arch, output, root):
    """nvcc compiling the device code of one csrc/cuda/*.cu for one arch, with ptxas -v."""
    from torch.utils.cpp_extension import include_paths

    includes = [os.path.join(root, "csrc"), sysconfig.get_paths()["include"], *include_paths()]
    return [
        os.path.join(cuda_home(), "bin", "nvcc"), "-cubin", f"-arch=sm_{arch}", "-std=c++20", "-O3",
        "--use_fast_math", "-Xptxas=-v", *DEFINES, "-o", output, source,
        *[f"-I{p}" for p in includes],
    ]
