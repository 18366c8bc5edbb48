"""The real CLI, end to end, on the tiny model: train, reload with plain transformers, caption, eval, errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BlipForConditionalGeneration, BlipProcessor

from captune.cli import main

METRIC_KEYS = {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "exact_match"}


@pytest.fixture(scope="module")
def run_dir(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main([
        "train", "--data", str(synthetic_dir), "--model", "tiny", "--output", str(out), "--max-steps", "6",
        "--batch-size", "16", "--lr", "1e-3", "--num-workers", "0", "--eval-every", "3",
        "--set", "train.log_every_steps=1", "--set", "train.warmup_ratio=0.5", "--set", "eval.num_beams=1", "--set", "eval.max_new_tokens=6",
        "--set", "eval.min_new_tokens=0",
    ])
    assert code == 0
    return out


def test_run_dir_layout(run_dir):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "val_predictions.jsonl"):
        assert (run_dir / name).is_file(), name
    for sub in ("best", "last"):
        files = {p.name for p in (run_dir / sub).iterdir()}
        assert {"config.json", "model.safetensors", "processor_config.json", "captune.json"} <= files, files
    assert not list(run_dir.glob("*.tmp"))


def test_metrics_jsonl_lines(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    val = [r for r in lines if r["split"] == "validation"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "epoch", "loss", "lr"} <= set(r) for r in train)
    lrs = [r["lr"] for r in train]
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] and lrs[3] > lrs[4] > lrs[5]  # 3 warmup steps, then cosine
    assert [r["step"] for r in val] == [3, 6]  # every 3 steps, instead of at epoch ends (4 steps an epoch)
    assert all(METRIC_KEYS <= set(r) for r in val)


def test_config_yaml_is_resolved(run_dir):
    from captune.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    assert cfg.model.name == "tiny" and cfg.train.max_steps == 6 and cfg.eval.num_beams == 1


def test_best_reloads_with_plain_transformers_and_matches_caption(run_dir, synthetic_dir, capsys):
    model = BlipForConditionalGeneration.from_pretrained(run_dir / "best")
    processor = BlipProcessor.from_pretrained(run_dir / "best")
    images = sorted((synthetic_dir / "validation").glob("*.png"))[:3]
    from PIL import Image

    inputs = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6)
    plain = [c.strip() for c in processor.batch_decode(ids, skip_special_tokens=True)]

    capsys.readouterr()
    assert main(["caption", "--model", str(run_dir / "best"), "--max-new-tokens", "6", *map(str, images)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == plain


def test_eval_writes_metrics_and_predictions(run_dir, synthetic_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(run_dir / "best"), "--data", str(synthetic_dir), "--output", str(out),
                 "--max-new-tokens", "6"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert all(isinstance(metrics[k], float) for k in METRIC_KEYS - {"meteor"})
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 16  # the validation/ split
    assert {"id", "prediction", "references"} <= set(predictions[0])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "{tmp}/missing", "--model", "tiny"], "does not exist"),
        (["train", "--data", "{tmp}", "--model", "tiny"], "no metadata.jsonl or metadata.csv"),
        (["train", "--data", "{empty}", "--model", "tiny"], "dataset is empty"),
        (["train", "--data", "{data}", "--model", "no-such-org/no-such-model"], "cannot load model"),
        (["train", "--model", "tiny"], "no data"),
        (["eval", "--model", "{tmp}/nope", "--data", "{data}", "--output", "{tmp}/o"], "does not exist"),
        (["train", "--data", "{data}", "--model", "tiny", "--set", "train.nope=1"], "unknown config key"),
    ],
)
def test_clear_errors(argv, message, tmp_path, synthetic_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    subst = {"{tmp}": str(tmp_path), "{empty}": str(empty), "{data}": str(synthetic_dir)}
    for key, value in subst.items():
        argv = [a.replace(key, value) for a in argv]
    assert main(argv + ["--output", str(tmp_path / "run")] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("captune: error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_python_dash_m_and_help():
    import subprocess
    import sys

    for command in ([], ["train"], ["eval"], ["caption"], ["demo"]):
        result = subprocess.run([sys.executable, "-m", "captune", *command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage: captune" in result.stdout


def test_unexpected_errors_are_one_line_unless_debugging(monkeypatch, capsys):
    import captune.cli as cli

    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "cmd_check", broken)
    assert main(["check", "anything"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("captune: error: unexpected RuntimeError: boom (set CAPTUNE_DEBUG=1 for the traceback "
                           "and please report it)")
    monkeypatch.setenv("CAPTUNE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["check", "anything"])
