"""The Triton varlen attention (bertkern.ops.attention_triton) run by the Triton interpreter on
the CPU: forward and backward against an fp64 reference within FlashAttention's error bound,
causal masking, the Philox dropout convention, ragged and empty sequences, layouts, opcheck.

TRITON_INTERPRET=1 must be in the environment before triton is imported, and this pytest process
may have imported triton already, so the cases (tests/triton_interpret_worker.py) run in two
fresh subprocesses (one per core), once per module for every selected case; each test below
reports its own case. bf16 is not checked here (the interpreter's bf16 arithmetic is wrong): it
is covered by compiling (tests/test_attention_aot.py).
"""
import json
import os
import subprocess
import sys

import pytest

from tests.triton_interpret_worker import CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = 2
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def interpreter_results(request, tmp_path_factory):
    """Run every case selected in this session (not just the first test's) in subprocesses."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
    ]
    shards = [selected[i::WORKERS] for i in range(WORKERS)]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    tmp = tmp_path_factory.mktemp("triton_interpret")
    procs = []
    for i, shard in enumerate(s for s in shards if s):
        out = tmp / f"results{i}.json"
        log = open(tmp / f"log{i}.txt", "w+")
        cmd = [sys.executable, "-m", "tests.triton_interpret_worker", "--out", str(out), *shard]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, out, log))
    results = {}
    for proc, out, log in procs:
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        log.seek(0)
        tail = log.read()[-4000:]
        log.close()
        if out.exists():
            results.update(json.loads(out.read_text()))
        if rc != 0:
            # Cases that produced no result (the worker died or timed out) fail with the log.
            results["__worker_failure__"] = f"worker exited with {rc}:\n{tail}"
    return results


@pytest.mark.triton_interpret
@pytest.mark.timeout(TIMEOUT_S + 60)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_attention_interpreted(case, interpreter_results):
    if case not in interpreter_results:
        pytest.fail(interpreter_results.get("__worker_failure__", f"case {case} produced no result"))
    error = interpreter_results[case]
    if error is not None:
        pytest.fail(f"{case} failed under TRITON_INTERPRET=1:\n{error}", pytrace=False)
