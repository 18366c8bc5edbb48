"""Guards: a non-finite loss stops (or skips) naming the step; early stopping; trackers."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import captune.train
from captune.checkpoint import latest_checkpoint
from captune.cli import main
from captune.data.synthetic import make_synthetic
from captune.models import family_for

# Every run here is in-process and no test reads a Java-only metric: scored without Java (see conftest's no_java).
pytestmark = pytest.mark.usefixtures("no_java")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("data"), n_train=16, n_val=2)


@pytest.fixture(scope="module")
def train_only(tmp_path_factory) -> Path:
    """No validation split: these runs need no captioning or scoring, which keeps them to seconds."""
    root = make_synthetic(tmp_path_factory.mktemp("train_only"), n_train=16, n_val=1)
    shutil.rmtree(root / "validation")
    return root


def args(data: Path, output: Path, *extra: str) -> list[str]:
    return ["-q", "train", "--data", str(data), "--model", "tiny", "--output", str(output), "--batch-size", "4",
            "--lr", "1e-3", "--num-workers", "0", "--report-to", "none", "--save-every", "2",
            "--set", "train.log_every_steps=1", "--set", "eval.num_beams=1", "--set", "eval.min_new_tokens=0",
            "--set", "eval.max_new_tokens=4", *extra]


def nan_at_call(monkeypatch, bad_call: int) -> None:
    family = family_for("tiny")
    real, calls = family.loss_sum, []

    def loss(model, batch, *, label_smoothing):
        calls.append(1)
        value = real(model, batch, label_smoothing=label_smoothing)
        return value * float("nan") if len(calls) == bad_call else value

    monkeypatch.setattr(family, "loss_sum", loss)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(train_only, tmp_path, monkeypatch,
                                                                                 capsys):
    nan_at_call(monkeypatch, bad_call=3)
    run = tmp_path / "run"
    assert main(args(train_only, run, "--max-steps", "4")) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err and "step-00000002" in err
    assert latest_checkpoint(run).name == "step-00000002"
    assert not (run / "last").exists()
    state = torch.load(latest_checkpoint(run) / "optimizer.bin", weights_only=False)["state"]
    assert all(torch.isfinite(s["exp_avg"]).all() for s in state.values())


def test_nonfinite_loss_skip_goes_on_with_finite_weights(train_only, tmp_path, monkeypatch):
    nan_at_call(monkeypatch, bad_call=2)
    run = tmp_path / "run"
    assert main(args(train_only, run, "--max-steps", "3", "--set", "train.on_nonfinite=skip")) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(train_losses) == 3
    assert math.isnan(train_losses[1]) and math.isfinite(train_losses[0]) and math.isfinite(train_losses[2])
    weights = load_file(run / "last" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_early_stopping_after_patience_validations(data_dir, tmp_path, monkeypatch):
    # Validation never improves after the first: with patience 2 the run stops at the third validation.
    scores = iter([1.0, 0.5, 0.5, 0.5, 0.5, 0.5])
    monkeypatch.setattr(captune.train, "selection_score", lambda metrics, best: next(scores))
    run = tmp_path / "run"
    assert main(args(data_dir, run, "--epochs", "10", "--eval-every", "1",
                    "--set", "train.early_stopping_patience=2")) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["best_step"] == 1


def test_tensorboard_writes_event_files(train_only, tmp_path):
    full = args(train_only, tmp_path / "run", "--max-steps", "2")
    full[full.index("none")] = "tensorboard"
    assert main(full) == 0
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 0


def test_unknown_or_missing_tracker_is_a_clear_error(train_only, tmp_path, capsys):
    full = args(train_only, tmp_path / "run", "--max-steps", "1")
    full[full.index("none")] = "neptune"
    assert main(full) == 2
    assert "train.report_to" in capsys.readouterr().err
