"""A run resumed mid-epoch ends exactly where the uninterrupted run does even when something draws random numbers:
dropout, augmentation in DataLoader workers, random caption choice, accumulation windows (issue 14, item 1).

Each test trains three times on the tiny model: uninterrupted; stopped after step 2 (a stop request, as SIGTERM
makes, so a checkpoint is written mid-epoch); resumed from that checkpoint. The resumed run must log the same losses
and end with the same weights (<= 1e-6). test_resume.py covers the same for a run killed with SIGKILL.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

import captune.train
from captune.checkpoint import latest_checkpoint
from captune.cli import main
from captune.data.synthetic import make_synthetic

# Every run here is in-process and no test reads a Java-only metric: scored without Java (see conftest's no_java).
pytestmark = pytest.mark.usefixtures("no_java")


class StopAfter:
    """Stands in for checkpoint.StopRequests: a stop is requested once `steps` optimizer steps are done (the loop
    reads `requested` once a step)."""

    def __init__(self, steps: int):
        self.steps, self.reads = steps, 0

    def __enter__(self) -> "StopAfter":
        return self

    def __exit__(self, *exc) -> None:
        return None

    @property
    def requested(self) -> str | None:
        self.reads += 1
        return "SIGTERM" if self.reads >= self.steps else None


def train_only(root: Path, n: int, captions_per_image: int = 1) -> Path:
    data = make_synthetic(root, n_train=n, n_val=1)
    shutil.rmtree(data / "validation")  # no validation: only training to wait for
    if captions_per_image > 1:
        metadata = data / "train" / "metadata.jsonl"
        rows = [json.loads(line) for line in metadata.read_text().splitlines()]
        for row in rows:
            row["text"] = [row["text"], f"a picture of {row['text']}", f"there are {row['text']}"][:captions_per_image]
        metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


def run_args(data: Path, output: Path, *extra: str) -> list[str]:
    return ["-q", "train", "--data", str(data), "--model", "tiny", "--output", str(output), "--epochs", "2",
            "--batch-size", "4", "--lr", "1e-3", "--num-workers", "0", "--report-to", "none",
            "--set", "train.log_every_steps=1", *extra]


def train_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def final_weights(run: Path) -> dict:
    files = sorted((run / "last").glob("*.safetensors"))  # model.safetensors, or a LoRA adapter
    assert files
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def assert_resume_is_exact(tmp_path: Path, monkeypatch, data: Path, *extra: str, stop_after: int = 2) -> None:
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(run_args(data, reference, *extra)) == 0

    with monkeypatch.context() as patch:
        patch.setattr(captune.train, "StopRequests", lambda: StopAfter(stop_after))
        assert main(run_args(data, run, *extra)) == 0
    assert json.loads((latest_checkpoint(run) / "captune_state.json").read_text())["batch"] > 0  # mid-epoch
    assert not (run / "last").exists()
    assert main(run_args(data, run, *extra) + ["--resume"]) == 0

    assert train_losses(run) == pytest.approx(train_losses(reference), abs=1e-6)
    weights, expected = final_weights(run), final_weights(reference)
    assert weights.keys() == expected.keys()
    assert max((weights[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6


def test_lora_with_dropout_resumes_exactly(tmp_path, monkeypatch):
    """LoRA's dropout (0.05) draws from torch's global RNG. On today's code the resumed run's `skip_first_batches`
    loader draws its base seed from that RNG at another moment than the uninterrupted run did, so every mask after
    it differs (final weights up to 5.5e-3 apart)."""
    data = train_only(tmp_path / "data", 16)
    assert_resume_is_exact(tmp_path, monkeypatch, data, "--mode", "lora")


def test_augmentation_in_two_workers_resumes_exactly(tmp_path, monkeypatch):
    """Random crops drawn in 2 DataLoader workers. On today's code the crops come from each worker's `random`,
    seeded from a base seed the resumed loader draws differently, and batches go to other workers after a skip."""
    data = train_only(tmp_path / "data", 16)
    assert_resume_is_exact(tmp_path, monkeypatch, data, "--set", "data.augment=true", "--num-workers", "2")


def test_random_caption_choice_resumes_exactly(tmp_path, monkeypatch):
    """`caption_sampling random` (3 captions an image), in 2 workers. On today's code the choice comes from the
    worker's `random`, which a resumed run seeds differently."""
    data = train_only(tmp_path / "data", 16, captions_per_image=3)
    assert_resume_is_exact(tmp_path, monkeypatch, data, "--caption-sampling", "random", "--num-workers", "2")


def test_accumulation_over_an_odd_number_of_batches_resumes_exactly(tmp_path, monkeypatch):
    """20 pairs in batches of 4 = 5 batches an epoch, 2 per step: windows (2, 2, 1), a short one each epoch; stopped
    in the second epoch, after the short window, with LoRA dropout drawing in every micro-batch. Fails on today's
    code (the dropout masks shift as above)."""
    data = train_only(tmp_path / "data", 20)
    assert_resume_is_exact(tmp_path, monkeypatch, data, "--mode", "lora", "--grad-accum", "2", stop_after=4)


@pytest.mark.parametrize("preset, extra", [("tiny-florence2", ()), ("tiny-blip2", ("--grad-accum", "2")),
                                           ("tiny-blip2-t5", ("--grad-accum", "2"))])
def test_other_families_lora_resume_exactly(preset, extra, tmp_path, monkeypatch):
    """Florence-2 (encoder-decoder, BART's dropout 0.1 besides LoRA's) and BLIP-2 with both language models (OPT,
    Flan-T5), with accumulation: killed mid-epoch and resumed, the same run. (GIT, PaliGemma and SmolVLM: their
    test modules.)"""
    data = train_only(tmp_path / "data", 16)
    assert_resume_is_exact(tmp_path, monkeypatch, data, "--mode", "lora", "--model", preset, *extra)
