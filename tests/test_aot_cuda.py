"""Every CUDA C++ kernel compiles for sm_80 and sm_90 with zero spill stores (no GPU needed)."""
import glob
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.cuda_toolkit import cuda_home, nvcc_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(source, arch, tmp_path):
    out = subprocess.run(nvcc_command(source, arch, str(tmp_path / f"{arch}.cubin"), ROOT),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    report, entry = {}, None
    for line in out.stderr.splitlines():
        if m := ENTRY.search(line):
            entry = (m.group(1), m.group(2))
        elif (m := SPILLS.search(line)) and entry:
            report[entry] = (int(m.group(1)), int(m.group(2)))
            entry = None
    return report


@pytest.mark.aot
@pytest.mark.timeout(900)
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_cuda_kernels_compile_for_sm80_sm90_without_spills(source, tmp_path):
    if cuda_home() is None:
        pytest.skip("no CUDA toolkit")
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda arch: ptxas_report(source, arch, tmp_path), (80, 90)))
    for arch, report in zip(("sm_80", "sm_90"), reports):
        assert report, f"ptxas reported no kernels for {arch}"
        assert all(a == arch for _, a in report), report
        spilling = {name: s for (name, _), s in report.items() if s != (0, 0)}
        assert not spilling, f"{arch}: kernels that spill (stores, loads): {spilling}"
