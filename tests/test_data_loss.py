"""Nothing captune did not write is deleted, and nothing it did write is lost: export, best/ swaps, damaged or
malicious checkpoints, a full disk, a second run into the same directory (issue 14, items 5-10).

Every test here failed on the code before the fix (noted per test)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

import captune.train
from captune.checkpoint import STATE_FILE, checkpoint_dirs, save_model
from captune.cli import main
from captune.data.synthetic import make_synthetic
from captune.model import load_model_and_processor

# Every run here is in-process and no test reads a Java-only metric: scored without Java (see conftest's no_java).
pytestmark = pytest.mark.usefixtures("no_java")


@pytest.fixture(scope="module")
def train_only(tmp_path_factory) -> Path:
    """No validation split: runs need no captioning or scoring, which keeps them to seconds."""
    root = make_synthetic(tmp_path_factory.mktemp("train_only"), n_train=16, n_val=1)
    shutil.rmtree(root / "validation")
    return root


@pytest.fixture(scope="module")
def with_validation(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("with_val"), n_train=16, n_val=2)


def args(data: Path, output: Path, *extra: str) -> list[str]:
    return ["-q", "train", "--data", str(data), "--model", "tiny", "--output", str(output), "--batch-size", "4",
            "--lr", "1e-3", "--num-workers", "0", "--report-to", "none", "--save-every", "2", "--max-steps", "5",
            "--set", "train.log_every_steps=1", "--set", "train.keep_last=3", "--set", "eval.num_beams=1",
            "--set", "eval.min_new_tokens=0", "--set", "eval.max_new_tokens=4", "--set", "eval.caption_before=false",
            *extra]


def weights(model_dir: Path) -> dict:
    return load_file(model_dir / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.fixture(scope="module")
def finished(train_only, tmp_path_factory) -> Path:
    """An uninterrupted 5-step run (4 batches an epoch) with checkpoints at steps 2 and 4 (treat as read-only; copy it to
    damage it). --keep-checkpoints keeps them past the clean finish, which also saves step 5's; that one is removed,
    so the newest checkpoint is step 4's, as if the run had died before its end."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(args(train_only, run, "--keep-checkpoints")) == 0
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000002", "step-00000004", "step-00000005"]
    shutil.rmtree(run / "checkpoints" / "step-00000005")
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def loads(monkeypatch) -> list[Path]:
    loaded, real = [], captune.train.load_checkpoint
    monkeypatch.setattr(captune.train, "load_checkpoint", lambda acc, path: loaded.append(path) or real(acc, path))
    return loaded


# --- 5: export ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_run(tmp_path_factory) -> Path:
    """A run directory holding only best/ (the tiny model), enough for export."""
    run = tmp_path_factory.mktemp("model_run") / "run"
    model, processor = load_model_and_processor("tiny")
    save_model(model, processor, run / "best", {"base_model": "tiny", "prompt": "", "step": 3})
    (run / "metrics.jsonl").write_text("{}\n")
    return run


def test_export_refuses_a_non_empty_directory_and_keeps_its_files(model_run, tmp_path, capsys):
    """Before: export rmtree'd whatever --output held."""
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("someone's work")
    assert main(["export", str(model_run), "--output", str(target)]) == 2
    assert "not empty" in capsys.readouterr().err
    # --overwrite replaces an earlier export only, never a folder of other files.
    assert main(["export", str(model_run), "--output", str(target), "--overwrite"]) == 2
    assert "will not delete" in capsys.readouterr().err
    assert (target / "notes.txt").read_text() == "someone's work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary directory left behind


def test_export_onto_or_inside_its_own_run_is_refused(model_run, capsys):
    """Before: exporting a run onto itself replaced the whole run by the export."""
    before = sorted(p.relative_to(model_run) for p in model_run.rglob("*"))
    for target in (model_run, model_run / "exported", model_run / "best", model_run.parent):
        assert main(["export", str(model_run), "--output", str(target), "--overwrite"]) == 2
        assert "source" in capsys.readouterr().err
    assert sorted(p.relative_to(model_run) for p in model_run.rglob("*")) == before


def test_export_overwrite_replaces_an_earlier_export(model_run, tmp_path):
    target = tmp_path / "export"
    assert main(["-q", "export", str(model_run), "--output", str(target)]) == 0
    (target / "config.json").write_text("{}")  # an earlier export, since edited
    assert main(["-q", "export", str(model_run), "--output", str(target), "--overwrite"]) == 0
    assert json.loads((target / "config.json").read_text())["model_type"] == "blip"


def test_export_to_a_file_is_a_clear_error_and_leaves_no_tmp(model_run, tmp_path, capsys):
    """Before (item 16): `unexpected ...` and a FILE.tmp/ directory left behind."""
    target = tmp_path / "model.bin"
    target.write_text("x")
    assert main(["export", str(model_run), "--output", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


# --- 6: best/ ------------------------------------------------------------------------------------------------------

def test_a_failure_while_swapping_best_keeps_the_previous_best(tiny, tmp_path, monkeypatch):
    """Before: best/ was rmtree'd, then the new one renamed in; a failure in between left no best/."""
    model, processor = tiny
    best = tmp_path / "best"
    save_model(model, processor, best, {"step": 1})
    real = Path.rename

    def rename(self, target):
        if Path(target) == best and self.name.endswith(".tmp"):
            raise KeyboardInterrupt  # a Ctrl-C (or any failure) between taking the old best/ away and the rename
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, processor, best, {"step": 2})
    monkeypatch.undo()
    assert json.loads((best / "captune.json").read_text())["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_kill_mid_swap_is_repaired_before_best_is_used_again(tiny, tmp_path):
    """A SIGKILL between the two renames leaves the old best/ aside; the next start puts it back.
    Before: there was no aside copy (and no restore_interrupted_swap)."""
    from captune.checkpoint import restore_interrupted_swap

    model, processor = tiny
    best = tmp_path / "best"
    save_model(model, processor, best, {"step": 1})
    best.rename(tmp_path / ".best.k1ll3d.old")  # the state a kill between the renames leaves
    restore_interrupted_swap(best)
    assert json.loads((best / "captune.json").read_text())["step"] == 1
    # Readers of a run directory (caption, eval, serve --model RUN) repair it too.
    from captune.cli import resolve_model

    best.rename(tmp_path / ".best.k1ll3d.old")
    assert resolve_model(str(tmp_path)) == str(best) and (best / "model.safetensors").is_file()


def test_after_resume_best_is_the_restored_best_step(with_validation, tmp_path, monkeypatch):
    """Validation improves every step; the run dies after step 4's best/ but before its checkpoint. Resumed from
    step 2's checkpoint, best/ must be step 2's model again. Before: best/ stayed step 4's while the run reported
    best_step 2."""
    scores = iter(range(1, 100))
    monkeypatch.setattr(captune.train, "selection_score", lambda metrics, name: float(next(scores)))
    run = tmp_path / "run"
    # 4 steps, checkpoints at 2 and 4; step 4's is removed, as if the run died after step 4's best/.
    assert main(args(with_validation, run, "--eval-every", "1", "--max-steps", "4", "--keep-checkpoints")) == 0
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000002", "step-00000004"]
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    assert json.loads((run / "best" / "captune.json").read_text())["step"] == 4
    # Resume to step 2 only, with no further improvement: best/ must describe step 2.
    monkeypatch.setattr(captune.train, "selection_score", lambda metrics, name: 0.0)
    assert main(args(with_validation, run, "--resume", "--max-steps", "2")) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_step"] == 2
    assert json.loads((run / "best" / "captune.json").read_text())["step"] == 2
    assert_same_weights(weights(run / "best"), weights(run / "last"))  # last/ is the step-2 model here


# --- 7: damaged checkpoints ---------------------------------------------------------------------------------------

def damage_flip_byte(checkpoint: Path) -> None:
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the recorded hash can tell
    path.write_bytes(bytes(data))


def damage_truncate(checkpoint: Path) -> None:
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def damage_empty_rng(checkpoint: Path) -> None:
    (checkpoint / "random_states_0.pkl").write_bytes(b"")


@pytest.mark.parametrize("damage, words", [(damage_flip_byte, "hash"),
                                           (damage_empty_rng, "random_states_0.pkl is 0 bytes")])
def test_damage_is_found_from_what_was_recorded_at_save_time(finished, tmp_path, damage, words):
    """Before: a flipped byte resumed from garbage, and an empty RNG file resumed silently without the RNG state
    (Accelerate logs "Could not load random states" at info level and goes on)."""
    from captune.checkpoint import checkpoint_damage

    run = copy_run(finished, tmp_path)
    assert checkpoint_damage(run / "checkpoints" / "step-00000004") is None
    damage(run / "checkpoints" / "step-00000004")
    assert words in checkpoint_damage(run / "checkpoints" / "step-00000004")


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(finished, tmp_path, monkeypatch, capsys):
    """Before: the truncated model file ended the run with `unexpected SafetensorError`."""
    run = copy_run(finished, tmp_path)
    damage_truncate(run / "checkpoints" / "step-00000004")
    loaded = loads(monkeypatch)
    assert main(["-q", "train", "--output", str(run), "--resume", "--max-steps", "6"]) == 0
    err = capsys.readouterr().err
    assert "step-00000004 is damaged: model.safetensors is 100 bytes" in err and "falling back" in err
    assert loaded == [run / "checkpoints" / "step-00000004", run / "checkpoints" / "step-00000002"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 retrained from the step-2 checkpoint


def test_resumed_from_a_fallback_ends_like_the_uninterrupted_run(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    damage_truncate(run / "checkpoints" / "step-00000004")
    assert main(["-q", "train", "--output", str(run), "--resume"]) == 0
    assert_same_weights(weights(run / "last"), weights(finished / "last"))


# --- 8: disk full --------------------------------------------------------------------------------------------------

TORCH_DISK_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")


@pytest.mark.parametrize("error", [TORCH_DISK_FULL, OSError(errno.ENOSPC, "No space left on device")])
def test_disk_full_during_a_checkpoint_says_so_and_keeps_the_last_good_one(train_only, tmp_path, monkeypatch, capsys,
                                                                           error):
    # (The two error shapes: PyTorch's zip writer, and a plain OSError as safetensors/json writes raise.)
    """Before: `unexpected RuntimeError: [enforce fail at inline_container.cc:672]` and a half-written
    .tmp-step directory."""
    import accelerate.checkpointing

    real = accelerate.checkpointing.save

    def save(obj, path, *a, **k):
        if "step-00000004" in str(path):
            raise error
        return real(obj, path, *a, **k)

    monkeypatch.setattr(accelerate.checkpointing, "save", save)
    run = tmp_path / "run"
    assert main(args(train_only, run)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the disk is full" in err and ".tmp-step-00000004" in err
    assert "step-00000002, is intact" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    from captune.checkpoint import checkpoint_damage

    assert checkpoint_damage(run / "checkpoints" / "step-00000002") is None


# --- 9: a second run into the same directory ----------------------------------------------------------------------

def test_a_second_train_into_a_run_directory_is_refused(finished, train_only, tmp_path, capsys):
    """Before: the second run silently replaced the first."""
    run = copy_run(finished, tmp_path)
    metrics = (run / "metrics.jsonl").read_text()
    assert main(args(train_only, run, "--max-steps", "1")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == metrics
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000002", "step-00000004"]
    assert main(args(train_only, run, "--max-steps", "1", "--overwrite")) == 0
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert checkpoint_dirs(run) == []  # the old run's checkpoints went with --overwrite


# --- 10: resume never runs code from a checkpoint -----------------------------------------------------------------

class Plant:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_executes_a_pickle_planted_in_a_checkpoint(finished, tmp_path, monkeypatch, capsys):
    """Before: Accelerate loaded custom_checkpoint_0.pkl (the scheduler) with weights_only=False and ran it."""
    import torch

    run = copy_run(finished, tmp_path)
    marker = tmp_path / "pwned"
    newest, older = run / "checkpoints" / "step-00000004", run / "checkpoints" / "step-00000002"
    torch.save(Plant(marker), newest / "custom_checkpoint_0.pkl")
    # An older checkpoint without the manifest (as an earlier captune wrote them), with a planted optimizer file:
    # the weights-only unpickler must refuse it too.
    state = json.loads((older / STATE_FILE).read_text())
    state.pop("files")
    (older / STATE_FILE).write_text(json.dumps(state))
    torch.save({"state": Plant(marker), "param_groups": []}, older / "optimizer.bin")
    assert main(["train", "--output", str(run), "--resume", "--max-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "custom_checkpoint_0.pkl" in err and "no checkpoint" in err
    assert not marker.exists()
    # The plant is live: unpickled with code allowed (as Accelerate does for custom objects), it runs.
    torch.load(newest / "custom_checkpoint_0.pkl", weights_only=False)
    assert marker.exists()
