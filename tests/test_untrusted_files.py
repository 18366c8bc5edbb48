"""Files from elsewhere never run code or leak what lies outside the dataset (issue 14, items 11-12; item 10, pickles
in checkpoints, is in test_data_loss.py)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from captune.cli import main
from captune.data import build_dataset
from captune.errors import CaptuneError
from captune.model import load_model_and_processor
from datafiles import png

SECRET = "API_TOKEN=hunter2-do-not-leak"


def sidecar_split(folder: Path, secret_file: Path, n: int = 3) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        png(folder / f"img{i}.png", (40 * i, 100, 200))
        (folder / f"img{i}.txt").write_text(f"a plain picture number {i}\n")
    png(folder / "leak.png", (10, 10, 10))
    (folder / "leak.txt").symlink_to(secret_file)


@pytest.fixture
def leaky(tmp_path) -> Path:
    """Sidecar data whose leak.txt (train and validation) is a symlink to a file outside the dataset."""
    secret = tmp_path / "secret.env"
    secret.write_text(SECRET + "\n")
    root = tmp_path / "data"
    sidecar_split(root / "train", secret)
    sidecar_split(root / "validation", secret)
    return root


def test_sidecar_symlinked_out_of_the_dataset_is_refused_by_check(leaky, capsys):
    """Before: `captune check` read the linked file as a caption and said ok."""
    assert main(["check", str(leaky)]) == 1
    out = capsys.readouterr().out
    assert out.count("leak.txt: caption file is a symlink pointing outside the dataset folder") == 2
    assert SECRET not in out


def test_sidecar_symlinked_out_of_the_dataset_never_reaches_training_or_the_report(leaky, tmp_path):
    """Before: the secret became a training caption, a validation reference, and a line of report.html."""
    data = build_dataset(leaky, strict=False)
    captions = [c for s in data.train + data.validation for c in s.captions]
    assert len(captions) == 6 and not any(SECRET in c for c in captions)
    with pytest.raises(CaptuneError, match="symlink pointing outside"):
        build_dataset(leaky)  # strict reading (on_bad_sample=error) stops on it
    run = tmp_path / "run"
    assert main(["-q", "train", "--data", str(leaky), "--model", "tiny", "--output", str(run), "--max-steps", "1",
                 "--batch-size", "4", "--num-workers", "0", "--report-to", "none", "--set", "eval.num_beams=1",
                 "--set", "eval.min_new_tokens=0", "--set", "eval.max_new_tokens=2"]) == 0
    for name in ("report.html", "summary.json", "val_predictions.jsonl", "val_predictions_before.jsonl"):
        assert SECRET not in (run / name).read_text(), name
    skipped = json.loads((run / "summary.json").read_text())["skipped_samples"]
    assert {s["id"] for s in skipped} == {"leak.png"}


@pytest.fixture(scope="module")
def pickled_model_dirs(tmp_path_factory):
    """The tiny model saved as pytorch_model.bin (real weights), and a copy whose .bin plants a file on unpickling."""
    root = tmp_path_factory.mktemp("pickled")
    model, processor = load_model_and_processor("tiny")
    good = root / "good"
    model.save_pretrained(good)
    processor.save_pretrained(good)
    os.remove(good / "model.safetensors")
    torch.save(model.state_dict(), good / "pytorch_model.bin")
    bad = root / "bad"
    shutil.copytree(good, bad)
    torch.save({"weight": Plant(root / "pwned")}, bad / "pytorch_model.bin")
    return good, bad, root / "pwned", model


class Plant:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_load_with_a_warning_that_names_safetensors(pickled_model_dirs, caplog):
    """Before: pytorch_model.bin loaded without a word."""
    good, _, _, reference = pickled_model_dirs
    with caplog.at_level(logging.WARNING, logger="captune"):
        model, _ = load_model_and_processor(str(good))
    assert "pickled weights (pytorch_model.bin)" in caplog.text and "safetensors" in caplog.text
    key = "text_decoder.bert.embeddings.word_embeddings.weight"
    assert torch.equal(model.state_dict()[key], reference.state_dict()[key])


def test_malicious_pickled_weights_are_refused_in_one_line_and_never_run(pickled_model_dirs, tmp_path, capsys):
    """Before: a multi-line torch UnpicklingError (`unexpected UnpicklingError` from the CLI)."""
    _, bad, marker, _ = pickled_model_dirs
    png(tmp_path / "x.png")
    assert main(["caption", "--model", str(bad), str(tmp_path / "x.png")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("captune: error:")]
    assert len(errors) == 1 and "refuses to unpickle" in errors[0] and "model.safetensors" in errors[0]
    assert "Traceback" not in errors[0] and "unexpected" not in errors[0]
    assert not marker.exists()
