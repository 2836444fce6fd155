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


def nvcc_command(source, arch, output, root):
    """nvcc compiling the device code of one csrc/cuda/*.cu for one arch, with ptxas -v."""
    from torch.utils.cpp_extension import include_paths

    includes = [os.path.join(root, "csrc"), sysconfig.get_paths()["include"], *include_paths()]
    return [
        os.path.join(cuda_home(), "bin", "nvcc"), "-cubin", f"-arch=sm_{arch}", "-std=c++20", "-O3",
        "--use_fast_math", "-Xptxas=-v", "-o", output, source,
        *[f"-I{p}" for p in includes],
    ]
