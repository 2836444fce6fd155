"""Every measured number in README.md's performance section traces to a committed benchmark run.

The section links one CPU run folder, benchmarks/results/<machine>-<date>/, written by
``python -m bertkern.bench report results.json --out <folder>`` from a full
``pytest benchmarks --benchmark-only`` run: results.json (pytest-benchmark's raw JSON), COMMIT
(the commit it ran at, on a clean tree), report.md and the plots. This test checks that:
- the folder holds all of them, COMMIT matches the JSON's commit_info, the tree was clean, and
  (in a git checkout) that commit is an ancestor of HEAD;
- every number with a unit (``2.52x``, ``410 ms``, ``1.97 s``) and every interval
  (``[1.31, 1.55]``) in the section appears verbatim in that report.md, and each modeled GPU figure (a paragraph about the GPU model) in the
  committed GPU-model report (benchmarks/results/gpu-model/report.md);
- the chart the section embeds is that folder's, and exists.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
GPU_MODEL_REPORT = os.path.join(ROOT, "benchmarks", "results", "gpu-model", "report.md")
MEASURED = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:x| ms| s| us)(?![\w])|\[\d+\.\d+, \d+\.\d+\]")


def _performance_section() -> str:
    text = open(README, encoding="utf-8").read()
    start = text.index("## Performance")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _run_folder(section: str) -> str:
    folders = sorted(set(re.findall(r"benchmarks/results/([\w.-]+)/", section)) - {"gpu-model"})
    assert len(folders) == 1, f"the performance section must link exactly one CPU run folder: {folders}"
    return os.path.join(ROOT, "benchmarks", "results", folders[0])


def _measured_lines(section: str) -> tuple[list[str], list[str]]:
    """(paragraphs of measured numbers, paragraphs of modeled GPU numbers): a paragraph that
    speaks of the GPU model holds model figures, every other one measured CPU figures."""
    measured, modeled = [], []
    for paragraph in section.split("\n\n")[1:]:  # [0] is the heading
        is_model = re.search(r"\bmodel(?:ed)?\b", paragraph, re.I) and "GPU" in paragraph
        (modeled if is_model else measured).append(paragraph)
    return measured, modeled


def test_run_folder_is_complete_and_from_a_clean_commit():
    folder = _run_folder(_performance_section())
    for name in ("results.json", "COMMIT", "report.md"):
        assert os.path.exists(os.path.join(folder, name)), f"{folder} lacks {name}"
    commit = open(os.path.join(folder, "COMMIT")).read().strip()
    assert re.fullmatch(r"[0-9a-f]{40}", commit), commit
    info = json.load(open(os.path.join(folder, "results.json")))["commit_info"]
    assert info.get("id") == commit, (info.get("id"), commit)
    assert info.get("dirty") is False, "the committed run was made on a dirty tree"
    if shutil.which("git") and os.path.isdir(os.path.join(ROOT, ".git")):
        known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT).returncode == 0
        if not known:
            pytest.skip("shallow clone: the run's commit is not in this checkout")
        ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=ROOT)
        assert ancestor.returncode == 0, f"the run's commit {commit} is not an ancestor of HEAD"


def test_every_readme_number_is_in_the_committed_report():
    section = _performance_section()
    report = open(os.path.join(_run_folder(section), "report.md"), encoding="utf-8").read()
    gpu_report = open(GPU_MODEL_REPORT, encoding="utf-8").read()
    measured, modeled = _measured_lines(section)
    assert measured, "no measured numbers found in the performance section"
    missing = [(n, line[:60]) for line in measured for n in MEASURED.findall(line) if n not in report]
    assert not missing, f"README numbers not in the committed report: {missing}"
    # the model report's tables write ratios without the "x"
    missing = [(n, line[:60]) for line in modeled for n in MEASURED.findall(line)
               if not re.search(r"(?<![\d.])" + re.escape(n.rstrip("x")) + r"(?![\d])", gpu_report)]
    assert not missing, f"README model figures not in the GPU-model report: {missing}"


def test_embedded_chart_is_the_runs():
    section = _performance_section()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", section)
    assert images, "the performance section embeds no chart"
    folder = os.path.relpath(_run_folder(section), ROOT)
    for image in images:
        assert image.startswith(folder + "/"), (image, folder)
        assert os.path.exists(os.path.join(ROOT, image)), image
