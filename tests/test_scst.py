"""SCST: the baseline, the policy-gradient loss over sampled tokens, and `--objective scst` through the training
machinery (metrics, report, best/, exact resume, config errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import torchrun
from safetensors.torch import load_file

import captune.train
from captune.cider import build_cider_d, caption_words, cider_d
from captune.cli import main
from captune.config import load_config
from captune.data.records import CaptionSample
from captune.data.synthetic import make_synthetic
from captune.errors import CaptuneError
from captune.scst import build_scst, rewards_and_baseline


@pytest.fixture(autouse=True)
def no_java(monkeypatch):
    monkeypatch.setattr("captune.metrics.shutil.which", lambda name: None)


def samples() -> list[CaptionSample]:
    return [CaptionSample("a", ("two red circles", "two red round things"), image=None),
            CaptionSample("b", ("one blue square",), image=None),
            CaptionSample("c", ("three green triangles", "some green triangles"), image=None)]


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_rewards_are_cider_d_against_training_frequencies_and_the_baseline_is_as_named(baseline):
    setup = build_scst(samples(), samples=3, baseline=baseline, prompt="", max_new_tokens=8, tokenize=None)
    sampled = ["two red circles", "two blue circles", "a dog", "three green triangles", "green", ""]
    greedy = ["two red circles", "some triangles"]
    rewards, base = rewards_and_baseline(setup, sampled, greedy, index=[0, 2])
    refs = [[caption_words(c) for c in samples()[i].captions] for i in (0, 2)]
    cider = build_cider_d([[caption_words(c) for c in s.captions] for s in samples()])  # all training images
    expected = cider_d(cider, [[caption_words(c) for c in sampled[:3]], [caption_words(c) for c in sampled[3:]]], refs)
    assert rewards.flatten().tolist() == pytest.approx([v for row in expected for v in row])
    assert rewards[0, 0] > rewards[0, 1] > rewards[0, 2] >= 0
    if baseline == "mean":  # each sample against the mean of its image's *other* samples
        assert base[0, 0].item() == pytest.approx((expected[0][1] + expected[0][2]) / 2)
        assert base[1, 2].item() == pytest.approx((expected[1][0] + expected[1][1]) / 2)
    else:
        greedy_rewards = cider_d(cider, [[caption_words(greedy[0])], [caption_words(greedy[1])]], refs)
        assert base[:, 0].tolist() == pytest.approx([r[0] for r in greedy_rewards])
        assert (base == base[:, :1]).all()


def test_sequence_log_probability_counts_the_sampled_tokens_and_the_end_not_padding(tiny):
    """SCST's loss is sum(advantage * sequence_nll): each row's -log p over its caption tokens, end token included."""
    from captune.models import family_of

    model, processor = tiny
    family = family_of(model)
    text = family.tokenize(processor, ["a dog", "a big red dog on a mat"], prompt="", max_tokens=20)
    labels = text["labels"]
    batch = {**text, "pixel_values": torch.rand(2, 3, 64, 64)}
    with torch.no_grad():
        nll = family.sequence_nll(model, batch)
        log_probs = model(pixel_values=batch["pixel_values"], input_ids=text["input_ids"],
                          attention_mask=text["attention_mask"]).logits.float().log_softmax(-1)
    counted = []
    for row in range(2):
        targets = [(t, labels[row, t + 1].item()) for t in range(labels.shape[1] - 1) if labels[row, t + 1] >= 0]
        counted += [target for _, target in targets]
        assert nll[row].item() == pytest.approx(-sum(log_probs[row, t, target].item() for t, target in targets),
                                                rel=1e-4)
    sep, pad = processor.tokenizer.sep_token_id, processor.tokenizer.pad_token_id
    assert counted.count(sep) == 2 and pad not in counted
    assert len(counted) == int(family.target_tokens(text))


def test_config_and_data_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(CaptuneError, match="scst_samples must be >= 2"):
        load_config(overrides={"train": {"objective": "scst", "scst_samples": 1}})
    assert load_config(overrides={"train": {"objective": "scst", "scst_samples": 1, "scst_baseline": "greedy"}})
    with pytest.raises(CaptuneError, match="auto"):
        load_config(overrides={"train": {"objective": "scst", "batch_size": "auto"}})
    with pytest.raises(CaptuneError, match="tar shards"):
        build_scst(object(), samples=2, baseline="mean", prompt="", max_new_tokens=5, tokenize=None)


def scst_args(data: Path, output: Path, *extra: str) -> list[str]:
    return ["-q", "train", "--data", str(data), "--model", "tiny", "--output", str(output), "--objective", "scst",
            "--scst-samples", "3", "--batch-size", "4", "--lr", "1e-3", "--num-workers", "0", "--report-to", "none",
            "--set", "train.log_every_steps=1", "--set", "eval.num_beams=1", "--set", "eval.min_new_tokens=0",
            "--set", "eval.max_new_tokens=4", "--set", "eval.caption_before=false", *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("data"), n_train=12, n_val=4)


def test_scst_run_logs_rewards_plots_them_and_keeps_best_by_cider(data_dir, tmp_path):
    run = tmp_path / "run"
    assert main(scst_args(data_dir, run, "--max-steps", "3", "--eval-every", "2", "--scst-baseline", "greedy")) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["reward"] >= 0 and r["greedy_reward"] >= 0 and r["loss"] == r["loss"] for r in train)
    assert [r["step"] for r in records if r["split"] == "validation"] == [2, 3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_metric"] == "cider" and summary["best_step"] in (2, 3)
    assert (run / "best" / "captune.json").is_file() and (run / "plots" / "reward.png").is_file()
    assert "SCST reward" in (run / "report.html").read_text()


def test_scst_resume_ends_where_an_uninterrupted_run_does(data_dir, tmp_path, monkeypatch):
    """Killed after step 2's checkpoint, resumed: same weights and same metrics.jsonl as one uninterrupted run (the
    samples are seeded by step and process, not by whatever consumed the global RNG before)."""
    args = ("--max-steps", "4", "--save-every", "2", "--set", "train.keep_last=3")
    whole = tmp_path / "whole"
    assert main(scst_args(data_dir, whole, *args)) == 0

    real, calls = captune.train.scst_backward_window, []

    def dies_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would: no checkpoint for step 3
        return real(*a, **k)

    cut = tmp_path / "cut"
    monkeypatch.setattr(captune.train, "scst_backward_window", dies_at_step_3)
    assert main(scst_args(data_dir, cut, *args)) == 130
    monkeypatch.setattr(captune.train, "scst_backward_window", real)
    assert main(scst_args(data_dir, cut, *args, "--resume")) == 0

    def weights(run):
        return load_file(str(run / "last" / "model.safetensors"))

    a, b = weights(whole), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def lines(run):
        return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert lines(whole) == lines(cut)


@pytest.mark.slow  # two processes under torchrun (gloo): ~30 s of start-up and collectives
def test_scst_under_two_processes_with_accumulation(data_dir, tmp_path):
    run = tmp_path / "run"
    args = scst_args(data_dir, run, "--max-steps", "2", "--grad-accum", "2", "--batch-size", "2")[1:]
    torchrun(["-m", "captune", "-q", *args], timeout=600)
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["reward"] is not None for r in train)
    assert (run / "best" / "captune.json").is_file()


@pytest.mark.parametrize("preset", sorted(__import__("captune.models", fromlist=["PRESETS"]).PRESETS))
def test_every_family_scores_sampled_captions_over_its_loss_positions(preset):
    """sequence_nll sums, per caption, exactly what the family's loss_sum sums (its own label alignment)."""
    from PIL import Image

    from captune.model import load_model_and_processor
    from captune.models import build_batch, family_of

    model, processor = load_model_and_processor(preset, seed=0)
    model.eval()  # dropout (BLIP-2's Q-Former) would make two forwards differ
    family = family_of(model)
    images = [Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (30, 40), (20, 20, 200))]
    batch = build_batch(family, processor, images, ["a red square", "two blue circles on a table"], prompt="",
                        max_tokens=20)
    with torch.no_grad():
        nll = family.sequence_nll(model, batch)
        total = family.loss_sum(model, batch, label_smoothing=0.0)
    assert nll.shape == (2,) and (nll > 0).all()
    assert nll.sum().item() == pytest.approx(total.item(), rel=1e-4)


@pytest.mark.parametrize("preset", ["tiny-git", "tiny-florence2", "tiny-paligemma", "tiny-smolvlm"])
def test_scst_trains_other_families(preset, data_dir, tmp_path):
    run = tmp_path / "run"
    args = [a if a != "tiny" else preset for a in scst_args(data_dir, run, "--max-steps", "1")]
    assert main(args) == 0
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert train[0]["reward"] is not None and train[0]["loss"] == train[0]["loss"]
