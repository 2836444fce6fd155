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
    if os.environ.get("BERTKERN_CUDA") == "0" or not toolkit or torch.version.cuda is None:
        pytest.skip("built without CUDA (no toolkit, a CPU-only torch, or BERTKERN_CUDA=0)")
    assert bertkern.cuda_kernels_built()


def _bash_block_after(text: str, heading: str) -> list[str]:
    section = text.split(heading, 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_ci_installs_and_tests_with_the_readme_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    install = _bash_block_after(readme, "## Install")
    assert install and all(line.startswith("pip install") for line in install), install
    pip_lines = [line for line in ci if line.startswith("pip install")]
    assert pip_lines == install, (pip_lines, install)
    test_command = _bash_block_after(readme, "## The two commands")[0]
    assert test_command == "pytest tests", test_command
    assert any(line.startswith("python -m pytest tests ") for line in ci), ci
