"""Packaging: the extension loads without a GPU and importing bertkern queries no device."""
import os
import subprocess
import sys
import textwrap

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_queries_no_device():
    code = textwrap.dedent(
        """
        import torch
        def forbidden(*a, **k):
            raise AssertionError("import bertkern queried a CUDA device")
        for name in ("is_available", "device_count", "current_device", "get_device_properties",
                     "get_device_capability", "_lazy_init", "init"):
            setattr(torch.cuda, name, forbidden)
        import bertkern, bertkern.ops, bertkern.nn
        assert not torch.cuda.is_initialized()
        print("ok", bertkern.cuda_kernels_built())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_operators_registered():
    import bertkern  # noqa: F401

    for name in ("layer_norm_fwd", "layer_norm_bwd"):
        op = getattr(torch.ops.bertkern, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CPU")


def test_cuda_kernels_built_when_toolkit_present():
    # The build compiles the CUDA sources whenever a toolkit is found (no GPU needed), unless
    # BERTKERN_CUDA=0 asked otherwise.
    import shutil

    import pytest

    import bertkern

    toolkit = os.environ.get("CUDA_HOME") or os.path.exists("/usr/local/cuda/bin/nvcc") or shutil.which("nvcc")
    if os.environ.get("BERTKERN_CUDA") == "0" or not toolkit:
        pytest.skip("built without CUDA (no toolkit, or BERTKERN_CUDA=0)")
    assert bertkern.cuda_kernels_built()
