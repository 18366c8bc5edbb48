"""The CLI follows its users' habits: global flags anywhere, --version, defaults in --help, --dry-run, Hugging Face
Trainer's flag names, validation every N epochs or steps, checkpoints cleaned up, --push-to-hub (Hub API mocked at
the boundary: the Hub is unreachable here), quiet about what is expected."""

from __future__ import annotations

import json
import re
import logging
from pathlib import Path

import pytest

from captune.cli import TRAIN_FLAGS, build_parser, main, train_overrides
from captune.config import Config, load_config, to_dict
from captune.data.synthetic import make_synthetic

# Every run here is in-process and none of these tests reads a Java-only score: without Java, METEOR's start at each
# run's final validation (~60% of this file's CPU time) is skipped.
pytestmark = pytest.mark.usefixtures("no_java")


def train_args(data, out, *extra):
    return ["train", "--model", "tiny", "--data", str(data), "--output", str(out), "--batch-size", "16",
            "--lr", "1e-3", "--num-workers", "0", "--report-to", "none", "--set", "eval.num_beams=1",
            "--set", "eval.max_new_tokens=4", "--set", "eval.min_new_tokens=0", "--set", "eval.caption_before=false",
            *extra]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """32 training images (2 steps an epoch at batch 16) and 8 validation images."""
    return make_synthetic(tmp_path_factory.mktemp("habits"), n_train=32, n_val=8, seed=5)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def epochs_run(small_data, tmp_path_factory):
    """4 epochs validating every 2nd epoch end, checkpoints left to the default (removed at the end)."""
    out = tmp_path_factory.mktemp("habits") / "run"
    records = Records()
    for name in ("captune", "accelerate"):
        logging.getLogger(name).addHandler(records)
    try:
        assert main(train_args(small_data, out, "--epochs", "4", "--eval-every-epochs", "2")) == 0
    finally:
        for name in ("captune", "accelerate"):
            logging.getLogger(name).removeHandler(records)
    return out, records.messages


def validation_steps(run: Path) -> list[int]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in lines if r["split"] == "validation"]


def test_global_flags_are_accepted_anywhere():
    parser = build_parser()
    for argv in (["-q", "caption", "--model", "m", "a.png"], ["caption", "--model", "m", "a.png", "-q"],
                 ["caption", "-q", "--model", "m", "a.png"], ["check", "data", "--quiet"]):
        assert parser.parse_args(argv).quiet is True, argv
    assert parser.parse_args(["caption", "--model", "m", "a.png"]).quiet is False
    assert parser.parse_args(["report", "run", "-v"]).verbose is True
    assert parser.parse_args(["-v", "report", "run"]).verbose is True  # a subcommand does not reset it


def test_version(capsys):
    from captune import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"captune {__version__}"


def test_train_help_shows_every_default():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    from captune.model import DEFAULT_MODEL
    from captune.models import family_defaults

    defaults, by_family = to_dict(Config()), family_defaults(DEFAULT_MODEL)
    for action in train._actions:
        if action.dest in TRAIN_FLAGS:
            key = ".".join(TRAIN_FLAGS[action.dest])
            value = defaults
            for part in TRAIN_FLAGS[action.dest]:
                value = value[part]
            shown = by_family[key] if value is None and key in by_family else value if value not in ("", None) else "none"
            assert "(default: " in action.help, action.dest
            if "config key" in action.help:  # else the flag's own help states a family-dependent default
                assert f"(default: {shown}" in action.help and f"config key {key})" in action.help, action.dest
    helptext = train.format_help()
    assert "default: 1e-05" in helptext and "--learning-rate" in helptext and "-q, --quiet" in helptext


def test_trainer_flag_names_are_aliases():
    args = build_parser().parse_args([
        "train", "--learning_rate", "3e-4", "--num-train-epochs", "2", "--per_device_train_batch_size", "4",
        "--gradient-accumulation-steps", "2", "--output_dir", "runs/x", "--warmup_ratio", "0.1",
        "--weight-decay", "0.01", "--eval_steps", "5", "--save-steps", "7", "--logging_steps", "3",
    ])
    cfg = load_config(None, train_overrides(args))
    t = cfg.train
    assert (t.lr, t.epochs, t.batch_size, t.grad_accum, t.warmup_ratio, t.weight_decay) == (3e-4, 2, 4, 2, 0.1, 0.01)
    assert (t.eval_every_steps, t.save_every_steps, t.log_every_steps, cfg.output) == (5, 7, 3, "runs/x")
    assert build_parser().parse_args(["train", "--resume-from-checkpoint"]).resume is True


def test_dry_run_prints_config_counts_and_parameters_and_writes_nothing(small_data, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "--model", "tiny", "--data", str(small_data), "--output", str(out), "--epochs", "3",
                 "--mode", "frozen-vision", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    assert "epochs: 3" in printed and "mode: frozen-vision" in printed  # the resolved YAML
    # Keys the config leaves to the model family are shown with the family's values, as train() would use them.
    from captune.models import family_defaults

    tiny = family_defaults("tiny")
    assert f"lr: {tiny['train.lr']}" in printed and f"batch_size: {tiny['train.batch_size']}" in printed
    assert "lr: null" not in printed
    assert "32 training images" in printed and "8 validation images" in printed
    from captune.finetune import apply_mode
    from captune.model import count_parameters, load_model_and_processor

    model = apply_mode(load_model_and_processor("tiny", seed=42)[0], "frozen-vision")
    trainable, total = count_parameters(model)
    assert f"{trainable:,} of {total:,} parameters trainable" in printed


def test_validation_every_nth_epoch_and_checkpoints_removed_at_a_clean_end(epochs_run):
    run, messages = epochs_run
    assert validation_steps(run) == [4, 8]  # epoch 2's end and the final validation; not epochs 1 and 3
    assert not (run / "checkpoints").exists()
    assert (run / "best" / "model.safetensors").is_file() and (run / "last" / "model.safetensors").is_file()
    assert "resumable checkpoints removed" in messages[-1] and "--keep-checkpoints" in messages[-1]
    # Expected noise is gone: BLIP's tied LM head at every checkpoint save.
    assert not any("Removed shared tensor" in m for m in messages)


def test_eval_every_steps_replaces_epoch_ends_and_keep_checkpoints_keeps_the_newest(small_data, tmp_path):
    run = tmp_path / "run"
    records = Records()
    logging.getLogger("captune").addHandler(records)
    try:
        assert main(train_args(small_data, run, "--epochs", "4", "--eval-every", "3", "--keep-checkpoints")) == 0
    finally:
        logging.getLogger("captune").removeHandler(records)
    assert validation_steps(run) == [3, 6, 8]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000008"]  # keep_last 1 by default
    assert "checkpoints kept" in records.messages[-1]

    # Trainer's --resume_from_checkpoint takes the newest checkpoint (or the run), and goes on from it.
    assert main(["train", "--epochs", "5", "--resume_from_checkpoint", str(run / "checkpoints" / "step-00000008")]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 10


def test_resume_from_an_older_checkpoint_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "checkpoints" / "step-00000004").mkdir(parents=True)
    assert main(["train", "--resume-from-checkpoint", str(tmp_path / "checkpoints" / "step-00000004")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "newest checkpoint" in err[0]


def test_tied_weights_note_is_dropped_but_other_shared_tensors_are_shown():
    from captune.train import _TiedWeightsNote

    note = _TiedWeightsNote({"text_decoder.cls.predictions.decoder.weight"})

    def record(names):
        return logging.LogRecord("accelerate.utils.other", logging.WARNING, "", 0,
                                 f"[RANK 0] Removed shared tensor {names} while saving. This should be OK", None, None)

    assert not note.filter(record("{'text_decoder.cls.predictions.decoder.weight'}"))
    assert note.filter(record("{'text_decoder.cls.predictions.decoder.weight', 'vision.encoder.weight'}"))
    assert note.filter(record("{'something.else'}"))


# ---- --push-to-hub -----------------------------------------------------------------------------------------------

def test_push_to_hub_offline_fails_in_one_line_before_training(small_data, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    out = tmp_path / "run"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login either
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    assert main(train_args(small_data, out, "--epochs", "1", "--push-to-hub", "me/blip-test")) == 2
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(train_args(small_data, out, "--epochs", "1", "--push-to-hub", "me/blip-test")) == 2
    assert main(train_args(small_data, out, "--epochs", "1", "--push-to-hub", "not a repo id")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("captune: error: --push-to-hub") for line in err), err
    assert "hf auth login" in err[0] and "HF_HUB_OFFLINE" in err[1] and "owner/name" in err[2]
    assert not out.exists()  # nothing trained, nothing written


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi with its network calls replaced: records create_repo / upload_folder (and what the folder held)."""
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: {"name": "me"})

    def create_repo(self, repo_id, *, private=False, exist_ok=False, repo_type=None, **kwargs):
        calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, folder_path, repo_id, repo_type=None, commit_message=None, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        card = (Path(folder_path) / "README.md").read_text() if (Path(folder_path) / "README.md").is_file() else ""
        calls.append(("upload_folder", repo_id, folder_path, files, card))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_train_pushes_best_with_its_model_card(small_data, tmp_path, fake_hub):
    run = tmp_path / "run"
    assert main(train_args(small_data, run, "--epochs", "1", "--push-to-hub", "me/blip-test", "--hub-private")) == 0
    (create, upload) = fake_hub
    assert create == ("create_repo", "me/blip-test", True, True)
    assert upload[1] == "me/blip-test" and Path(upload[2]) == run / "best"
    assert {"README.md", "model.safetensors", "config.json", "captune.json"} <= set(upload[3])
    assert "pipeline_tag: image-text-to-text" in upload[4]


def test_export_pushes_the_merged_directory_with_the_card(epochs_run, tmp_path, fake_hub):
    run, _ = epochs_run
    assert main(["export", str(run), "--output", str(tmp_path / "export"), "--push-to-hub", "me/blip-export"]) == 0
    (create, upload) = fake_hub
    assert create == ("create_repo", "me/blip-export", False, True)
    assert Path(upload[2]) == tmp_path / "export" and "README.md" in upload[3] and "## Usage" in upload[4]


# ---- check ---------------------------------------------------------------------------------------------------------

def test_check_lists_every_problem_in_one_pass_with_a_progress_bar(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "validation"):
        (tmp_path / split).mkdir()
        for i in range(3):
            Image.new("RGB", (16, 16)).save(tmp_path / split / f"{i}.png")
    # train: the caption column is misnamed on every row; validation: three different row problems.
    (tmp_path / "train" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "caption_x": "a"}) + "\n" for i in range(3)))
    (tmp_path / "validation" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "0.png", "text": ""}) + "\n" + json.dumps({"file_name": "9.png", "text": "b"}) + "\n"
        + json.dumps({"file_name": "1.png"}) + "\n" + json.dumps({"file_name": "2.png", "text": "fine"}) + "\n")
    assert main(["check", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 7, out
    assert sum("no caption column" in line and "train/metadata.jsonl" in line for line in errors) == 3
    assert any("train/metadata.jsonl: has no usable rows" in line for line in errors)
    assert any("validation/metadata.jsonl:1: empty caption" in line for line in errors)
    assert any("image 9.png not found" in line for line in errors)
    assert any("validation/metadata.jsonl:3: no caption column" in line for line in errors)
    assert re.search(r"validation +1 images", out)  # the good row is still counted
    assert "checking validation" in err  # the progress bar
    assert main(["check", str(tmp_path), "-q"]) == 1
    assert "checking" not in capsys.readouterr().err
