"""examples/train_mlm.py: trains with both encoders, and they agree.

With dropout 0 and the same seed, the torch and bertkern runs see the same data from the same
initial weights, so their loss curves match to float rounding.
"""
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_mlm.py"

TINY = ["--batch-size", "8", "--seq-len", "32", "--d-model", "32", "--layers", "2", "--heads", "2",
        "--ffn", "64", "--lr", "3e-3", "--seed", "1", "--device", "cpu", "--log-every", "0"]
STEPS = 30


def load_example():
    spec = importlib.util.spec_from_file_location("train_mlm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs():
    example = load_example()
    return {encoder: example.main(["--encoder", encoder, "--steps", str(STEPS), "--dropout", "0", "--nsp", *TINY])
            for encoder in ("torch", "bertkern")}


@pytest.mark.parametrize("encoder", ["torch", "bertkern"])
def test_loss_is_finite_and_decreases(runs, encoder):
    r = runs[encoder]
    losses = r["losses"]
    assert len(losses) == STEPS
    assert all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.2, f"{encoder}: loss went from {first:.4f} (first 5 steps) to {last:.4f} (last 5)"
    assert r["final_loss"] == pytest.approx(sum(losses[-10:]) / 10)
    assert r["tokens_per_s"] > 0
    assert 0.0 < r["padding_fraction"] < 1.0


def test_torch_and_bertkern_loss_curves_match(runs):
    a, b = runs["torch"]["losses"], runs["bertkern"]["losses"]
    assert runs["torch"]["padding_fraction"] == runs["bertkern"]["padding_fraction"]  # same data
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    assert worst < 1e-4, f"loss curves differ by {worst:.2e} relative\ntorch:    {a}\nbertkern: {b}"


def test_script_runs_from_the_command_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--encoder", "bertkern", "--steps", "3", *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "final loss:" in proc.stdout, proc.stdout
    assert "tokens/s" in proc.stdout and "padding:" in proc.stdout, proc.stdout
