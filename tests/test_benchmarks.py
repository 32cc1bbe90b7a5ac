"""The benchmark scripts run end to end (tiny sizes, one repetition; CPU here, the same code with
``--device cuda`` on a GPU): they must not rot between the sessions that report their numbers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script, args, expect", [
    ("segmentor.py", ["--size", "64", "--reps", "1", "--skip", "onnx,bf16"], "semask.optimize fp32"),
    ("speed.py", ["--size", "64", "--reps", "1", "--skip", "compile,onnx,bf16,channels_last"], "img/s"),
    ("backbone.py", ["--size", "64", "--reps", "1"], "semantic-layer overhead"),
    ("train_step.py", ["--families", "fpn", "--crops", "64", "--reps", "1", "--infer"], "infer fp32 B= 8"),
])
def test_benchmark_script_runs(script, args, expect):
    proc = subprocess.run([sys.executable, script, "--device", "cpu", "--threads", "1", *args], cwd=BENCHMARKS,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout and "img/s" in proc.stdout, proc.stdout[-2000:]
