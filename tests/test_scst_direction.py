"""SCST beats continued cross-entropy on held-out CIDEr on the synthetic task where cross-entropy plateaus (a small,
seeded version of benchmarks/scst_synthetic.py: see its docstring for the task)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# 64 training images, 60 cross-entropy steps (the greedy caption is the generic one by then), then 15 steps of each.
SMALL = ["--n-train", "64", "--n-val", "16", "--ce-steps", "60", "--steps", "15", "--scst-batch-size", "8",
         "--samples", "4"]


@pytest.mark.slow  # three short tiny-model trainings (about a minute on 2 quiet cores): the claim needs a trained model
def test_scst_beats_continued_cross_entropy_on_held_out_cider(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scst_synthetic.py"), "--output", str(tmp_path), "--seed", "0",
         *SMALL, "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads((tmp_path / "r.json").read_text())["results"]
    # Cross-entropy's greedy caption is the generic one for every image; SCST learns to say what is in the picture.
    assert result["ce_more"]["distinct_captions"] <= 2 / 16
    assert result["scst"]["cider"] > result["ce_more"]["cider"]
    assert result["scst"]["distinct_captions"] > result["ce_more"]["distinct_captions"]
