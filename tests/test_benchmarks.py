"""The benchmarks' --smoke modes run end to end on the tiny model and print their ratio tables."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=240):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_train_step_smoke(tmp_path):
    out = _run(ROOT / "benchmarks/train_step.py", "--smoke", "--batch-sizes", "2", "--variants", "notebook", "captune",
               "--json", tmp_path / "r.json")
    assert "| 2 | notebook |" in out and "| 2 | captune |" in out and "x notebook" in out
    assert (tmp_path / "r.json").is_file()


@pytest.mark.slow
def test_caption_smoke():
    out = _run(ROOT / "benchmarks/caption.py", "--smoke")
    assert "| greedy | captune |" in out and "| beam 3 | pipeline |" in out


@pytest.mark.slow
def test_gpu_bench_smoke(tmp_path):
    """gpu.sh's Python part on CPU with the tiny model: every section reports a number."""
    out = _run(ROOT / "benchmarks/gpu_bench.py", "--smoke", "--json", tmp_path / "gpu.json")
    for section in ("full", "frozen-vision", "lora", "notebook", "caption beam 3"):
        assert f"| {section} |" in out, out
