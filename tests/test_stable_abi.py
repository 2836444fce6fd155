"""The built extension uses only the LibTorch stable ABI and Python's limited API, so one build
loads in every torch >= 2.10 and every CPython >= 3.10 (README "Install").

What is checked, on the library this test imports (bertkern._C):
- every symbol it imports that a libtorch library defines is a function of the stable C shim,
  as declared in the installed torch's torch/csrc/stable/c/shim.h,
  torch/csrc/inductor/aoti_torch/c/*.h and, for the ATen ops the stable headers call,
  torch/csrc/inductor/aoti_torch/generated/c_shim_aten.h (aoti_torch_* / torch_*);
- it imports no C++ symbol of torch's namespaces (at::, c10::, torch::, caffe2::), whoever
  defines it; it does not link libtorch_python (tied to one CPython) or an OpenMP runtime of its
  own (the kernels use libtorch's thread pool);
- it is a limited-API module (``_C.abi3.so``).
The one exception, by name: the Fortran BLAS routines sgemm_ / dgemm_ and MKL's
MKL_Set_Num_Threads_Local, which libtorch_cpu exports from the BLAS it bundles. They are the
BLAS's own decades-old C ABI, not libtorch's; the extension binds them weakly and falls back to
torch::stable::matmul when they are absent (csrc/cpu/blas.h).

BERTKERN_COMPAT_PYTHON=/path/to/python runs the operator tests in that interpreter (another
torch and / or CPython, with pytest installed) against this same built library.
"""
from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import bertkern

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_LIB = os.path.join(os.path.dirname(torch.__file__), "lib")
TORCH_INCLUDE = os.path.join(os.path.dirname(torch.__file__), "include")
EXTENSION = bertkern._C.__file__

BLAS_ABI = {"sgemm_", "dgemm_", "MKL_Set_Num_Threads_Local"}
TORCH_NAMESPACES = re.compile(r"^(?:[\w:<>,* ]*?[ (])?(at|c10|torch|caffe2)::")

pytestmark = pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm not found")


def _nm(path: str, *flags: str) -> list[str]:
    out = subprocess.run(["nm", "-D", *flags, path], capture_output=True, text=True, check=True)
    return [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]


def _undefined(demangle: bool = False) -> list[str]:
    # Versioned names (memcpy@GLIBC_2.14) keep only the name; nm lists in the same order either way.
    flags = ("--undefined-only", "-C") if demangle else ("--undefined-only",)
    out = subprocess.run(["nm", "-D", *flags, EXTENSION], capture_output=True, text=True, check=True)
    names = []
    for line in out.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            names.append(parts[1].split("@")[0].strip())
    return names


def _undefined_outside_std() -> set[str]:
    # The C++ standard library's own names (std::ostringstream ...) stay: libc10 re-exports some
    # of them, but they are libstdc++'s ABI, not torch's.
    return {name for name, readable in zip(_undefined(), _undefined(demangle=True))
            if not re.match(r"^(?:(?:typeinfo|vtable|VTT|typeinfo name) for )?std::", readable)}


@functools.cache
def _libtorch_exports() -> set[str]:
    names: set[str] = set()
    for lib in glob.glob(os.path.join(TORCH_LIB, "lib*.so*")):
        names.update(s.split("@")[0] for s in _nm(lib, "--defined-only"))
    return names


@functools.cache
def _stable_shim_functions() -> set[str]:
    aoti = os.path.join(TORCH_INCLUDE, "torch", "csrc", "inductor", "aoti_torch")
    headers = [os.path.join(TORCH_INCLUDE, "torch", "csrc", "stable", "c", "shim.h")]
    headers += glob.glob(os.path.join(aoti, "c", "*.h"))
    # the ATen ops torch/csrc/stable/ops.h itself calls (fill_, full, new_empty ...)
    headers.append(os.path.join(aoti, "generated", "c_shim_aten.h"))
    declared: set[str] = set()
    for header in headers:
        text = open(header).read()
        declared.update(re.findall(r"\b((?:aoti_torch|torch)_\w+)\s*\(", text))
    assert len(declared) > 100, f"no shim declarations found under {TORCH_INCLUDE}"
    return declared


def test_imports_from_libtorch_only_stable_shim_functions():
    from_torch = _undefined_outside_std() & _libtorch_exports()
    assert from_torch, "the extension imports nothing from libtorch: wrong library inspected?"
    unstable = sorted(from_torch - _stable_shim_functions() - BLAS_ABI)
    assert not unstable, f"{EXTENSION} imports non-stable libtorch symbols: {unstable}"
    # The stable registration itself is there (a library built the old way would fail above).
    assert {"aoti_torch_library_init_def", "aoti_torch_library_init_impl"} <= from_torch


def test_imports_no_torch_cpp_symbols():
    cpp = sorted(name for name in _undefined(demangle=True) if TORCH_NAMESPACES.match(name))
    assert not cpp, f"{EXTENSION} imports C++ symbols of torch: {cpp}"


def test_links_no_python_or_openmp_specific_torch_library():
    out = subprocess.run(["readelf", "-d", EXTENSION], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    assert needed, out
    for lib in needed:
        assert not lib.startswith(("libtorch_python", "libgomp", "libiomp", "libomp")), needed


def test_is_limited_api_module():
    assert EXTENSION.endswith(".abi3.so"), EXTENSION


def test_stable_checks_name_their_python_type():
    # C++ checks cross the stable ABI as RuntimeError "<Type>: message"; bertkern's Python API
    # raises the named type (also a RuntimeError); a direct operator call keeps the RuntimeError.
    mask = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"^TypeError: key_padding_mask must be a bool tensor"):
        torch.ops.bertkern.mask_to_indices(mask)
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"^ValueError: layer_norm: eps must be >= 0"):
        torch.ops.bertkern.layer_norm_fwd(x, None, None, None, -1.0, False)
    from bertkern.errors import kernel_call

    with pytest.raises(ValueError, match=r"^layer_norm: eps must be >= 0") as info:
        kernel_call(torch.ops.bertkern.layer_norm_fwd, x, None, None, None, -1.0, False)
    assert isinstance(info.value, RuntimeError)

    def untyped():
        raise RuntimeError("expected scalar type Float but found Int")

    with pytest.raises(RuntimeError) as info:  # not a typed check: passes through unchanged
        kernel_call(untyped)
    assert type(info.value) is RuntimeError and str(info.value).startswith("expected scalar type")


@pytest.mark.skipif(not os.environ.get("BERTKERN_COMPAT_PYTHON"),
                    reason="set BERTKERN_COMPAT_PYTHON to an interpreter with another torch")
def test_same_build_passes_operator_tests_in_another_torch():
    python = os.environ["BERTKERN_COMPAT_PYTHON"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("BERTKERN_COMPAT_PYTHON")
    version = subprocess.run([python, "-c", "import sys, torch; print(sys.version.split()[0], torch.__version__)"],
                             capture_output=True, text=True, check=True, env=env).stdout.strip()
    tests = [os.path.join(ROOT, "tests", f"test_{name}.py")
             for name in ("layer_norm", "padding", "dropout", "attention", "package")]
    run = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, f"operator tests failed under {version}:\n{tail}"
    # The library loaded there is this build, not one built for that torch.
    loaded = subprocess.run([python, "-c", "import bertkern; print(bertkern._C.__file__)"],
                            capture_output=True, text=True, check=True, env=env).stdout.strip()
    assert os.path.samefile(loaded, EXTENSION), (loaded, EXTENSION)
