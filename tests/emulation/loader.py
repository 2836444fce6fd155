"""Build and load the test-only torch extension that runs csrc/cuda/*.cuh kernels on the CPU.

The extension (the files in SOURCES: emulated_layer_norm.cpp, emulated_padding.cpp) compiles
the CUDA kernel headers with g++ against the host emulation of the CUDA execution model
(cuda_host_emu.h) and registers CPU implementations under ``torch.ops.bertkern_emu`` with the
same schemas as the real ``torch.ops.bertkern`` ops. Nothing here imports bertkern.

The build is cached in tests/emulation/_build/ (git-ignored); torch's ninja build tracks header
dependencies, so editing a .cuh or the emulation header rebuilds it.
"""
import os
import threading

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(REPO_ROOT, "csrc")
BUILD_ROOT = os.path.join(HERE, "_build")

# Translation units of the extension. Kernels for more ops: add their launcher .cpp here.
SOURCES = [os.path.join(HERE, "emulated_layer_norm.cpp"), os.path.join(HERE, "emulated_padding.cpp")]
# The stable-ABI target, as setup.py builds bertkern._C: the extension, like bertkern's own,
# reaches libtorch only through csrc/torch_api.h (torch/csrc/stable, torch/headeronly).
TORCH_TARGET_VERSION = "0x020A000000000000"  # torch 2.10 (setup.py: TORCH_TARGET)
EXTRA_CFLAGS = ["-O2", "-std=c++20", f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]
INCLUDE_PATHS = [CSRC, HERE]
EXTENSION_NAME = "bertkern_emu_ops"

_lock = threading.Lock()
_loaded = False


def load_emulated_ops(verbose=False):
    """Build (once, cached on disk) and load the extension; returns ``torch.ops.bertkern_emu``."""
    global _loaded
    with _lock:
        if not _loaded:
            build_dir = os.path.join(BUILD_ROOT, EXTENSION_NAME)
            os.makedirs(build_dir, exist_ok=True)
            cpp_extension.load(
                name=EXTENSION_NAME,
                sources=SOURCES,
                extra_cflags=EXTRA_CFLAGS,
                extra_include_paths=INCLUDE_PATHS,
                build_directory=build_dir,
                is_python_module=False,
                with_cuda=False,
                verbose=verbose,
            )
            _loaded = True
    return torch.ops.bertkern_emu
