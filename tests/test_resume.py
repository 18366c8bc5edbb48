"""Checkpoints and resume: a run killed with SIGKILL (or stopped by SIGTERM) and resumed ends exactly where an
uninterrupted run does: same weights, same metrics.jsonl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from captune.checkpoint import STATE_FILE, checkpoint_dirs, latest_checkpoint
from captune.cli import main
from captune.data.synthetic import make_synthetic

SRC = str(Path(__file__).resolve().parents[1] / "src")
# The runs' metrics.jsonl are compared line by line across processes, so both sides score without Java (conftest's
# no_java; under Java each validation starts a JVM and each run's last one METEOR's, ~10 s): the subprocess is
# `python -m captune` as captune/__main__.py runs it, with the same Java-less scorer.
pytestmark = pytest.mark.usefixtures("no_java")
CLI_WITHOUT_JAVA = ("import shutil, sys, types, captune.metrics; "
                    "captune.metrics.shutil = types.SimpleNamespace(**{**vars(shutil), 'which': lambda name: None}); "
                    "from captune.cli import main; sys.exit(main())")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("data"), n_train=32, n_val=4)


def train_args(data: Path, output: Path) -> list[str]:
    # 32 pairs, batch 8: 4 steps an epoch, 8 in all; a checkpoint every 2 steps and at the epoch end.
    return ["train", "--data", str(data), "--model", "tiny", "--output", str(output), "--epochs", "2",
            "--batch-size", "8", "--lr", "1e-3", "--num-workers", "0", "--save-every", "2", "--report-to", "none",
            "--set", "train.log_every_steps=1", "--set", "eval.num_beams=1", "--set", "eval.min_new_tokens=0",
            "--set", "eval.max_new_tokens=5", "--set", "train.keep_last=3"]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """An uninterrupted run."""
    output = tmp_path_factory.mktemp("ref") / "run"
    assert main(["-q"] + train_args(data_dir, output)) == 0
    return output


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def comparable(records: list[dict]) -> list[dict]:
    # Throughput differs from run to run; everything else must not.
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]


def start_run(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen([sys.executable, "-c", CLI_WITHOUT_JAVA, "-q"] + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_step(process: subprocess.Popen, run: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file() and any(r.get("step", 0) >= step for r in read_metrics_safe(metrics)):
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended early: {process.communicate()[1][-2000:]}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"step {step} never logged")


def read_metrics_safe(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def assert_same_run(run: Path, reference: Path) -> None:
    resumed, uninterrupted = read_metrics(run), read_metrics(reference)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
    for a, b in zip(resumed, uninterrupted):
        if a["split"] == "train":
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
        else:
            assert comparable([a]) == comparable([b])
    weights, expected = load_file(run / "last" / "model.safetensors"), load_file(reference / "last" / "model.safetensors")
    assert weights.keys() == expected.keys()
    worst = max((weights[k] - expected[k]).abs().max().item() for k in expected)
    assert worst < 1e-6


def spy_on_loads(monkeypatch) -> list[Path]:
    import captune.train

    loaded, real = [], captune.train.load_checkpoint
    monkeypatch.setattr(captune.train, "load_checkpoint", lambda acc, path: loaded.append(path) or real(acc, path))
    return loaded


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(data_dir, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    process = start_run(train_args(data_dir, run))
    wait_for_step(process, run, 3)  # mid-epoch 0; the step-2 checkpoint is complete by then
    process.send_signal(signal.SIGKILL)
    process.wait()
    resume_from = latest_checkpoint(run)
    assert resume_from is not None
    state = json.loads((resume_from / STATE_FILE).read_text())
    assert 2 <= state["step"] < 8
    assert not (run / "last").exists()

    loaded = spy_on_loads(monkeypatch)
    assert main(train_args(data_dir, run) + ["--resume"]) == 0
    assert loaded == [resume_from]
    assert_same_run(run, reference)
    # The resumed run finished cleanly: its resumable state is gone (train.keep_checkpoints is off).
    assert not (run / "checkpoints").exists() and checkpoint_dirs(run) == []


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    process = start_run(train_args(data_dir, run))
    wait_for_step(process, run, 5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    assert "SIGTERM" in err
    stopped_at = max(r["step"] for r in read_metrics(run))
    assert latest_checkpoint(run).name == f"step-{stopped_at:08d}"
    assert not (run / "last").exists()

    # --resume alone with --output picks the run's own config.yaml.
    loaded = spy_on_loads(monkeypatch)
    assert main(["train", "--output", str(run), "--resume"]) == 0
    assert loaded == [run / "checkpoints" / f"step-{stopped_at:08d}"]
    assert_same_run(run, reference)


def test_resume_without_checkpoint_starts_over(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = train_args(data_dir, run) + ["--max-steps", "1"]
    loaded = spy_on_loads(monkeypatch)
    assert main(args + ["--resume"]) == 0
    assert loaded == []
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1]
