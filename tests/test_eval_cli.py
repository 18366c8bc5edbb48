"""`captune eval`: metrics.json contract, per-image scores, several models compared, generation flags, torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import torchrun

from captune import cli
from captune.data.synthetic import make_synthetic
from captune.metrics import score
from captune.model import load_model_and_processor
from captune.train import save_model

CONTRACT = {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "exact_match"}
FAST = ["--max-new-tokens", "4", "--batch-size", "8"]


@pytest.fixture(scope="module", autouse=True)
def no_java():
    """Score with the Java-less fallback here: METEOR's JVM costs ~10 s a call, and parity with pycocoevalcap
    under Java is tested in test_metrics.py. The torchrun test's subprocesses still use Java when present."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("captune.metrics.shutil.which", lambda name: None)
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory, no_java):
    """Synthetic data and a run directory whose best/ is a saved tiny model (another seed than `tiny`)."""
    root = tmp_path_factory.mktemp("eval")
    data = make_synthetic(root / "data", n_train=4, n_val=10)
    run = root / "run"
    model, processor = load_model_and_processor("tiny", seed=7)
    run.mkdir()
    save_model(model, processor, run / "best", {"base_model": "tiny", "prompt": "", "generation": {"num_beams": 1}})
    single = root / "single"
    assert cli.main(["-q", "eval", "--model", str(run), "--data", str(data), "--output", str(single), *FAST]) == 0
    return {"data": data, "run": run, "single": single, "root": root}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_single_model_keeps_documented_metrics_format(setup):
    metrics = json.loads((setup["single"] / "metrics.json").read_text())
    assert CONTRACT <= set(metrics)
    assert all(isinstance(metrics[k], float) for k in CONTRACT - {"meteor"})
    assert metrics["meteor"] is None and metrics["tokenizer"] == "simple"  # the Java-less fallback
    assert not any(isinstance(v, dict) for v in metrics.values())


def test_predictions_carry_image_and_per_image_scores_that_match_the_scorer(setup):
    records = _lines(setup["single"] / "predictions.jsonl")
    assert len(records) == 10
    for record in records:
        assert Path(record["image"]).is_file()
        assert {"id", "prediction", "references", "cider", "bleu_4"} <= set(record)
    # Recomputing from the file gives the same corpus and per-image numbers (the scorer's own per_item).
    preds = {r["id"]: r["prediction"] for r in records}
    refs = {r["id"]: r["references"] for r in records}
    again = score(preds, refs, per_item=True)
    metrics = json.loads((setup["single"] / "metrics.json").read_text())
    assert again["cider"] == pytest.approx(metrics["cider"])
    for record in records:
        assert record["cider"] == pytest.approx(again["per_item"][record["id"]]["cider"])
        assert record["bleu_4"] == pytest.approx(again["per_item"][record["id"]]["bleu_4"])


def test_two_models_give_one_table_and_a_column_each(setup, capsys):
    out = setup["root"] / "compare"
    run = str(setup["run"])
    capsys.readouterr()
    assert cli.main(["-q", "eval", "--model", "tiny", "--model", run, "--data", str(setup["data"]),
                     "--output", str(out), *FAST]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["metric", "tiny", run]
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["tiny", run]
    assert CONTRACT <= set(metrics["tiny"]) and CONTRACT <= set(metrics[run])
    single = json.loads((setup["single"] / "metrics.json").read_text())
    assert metrics[run]["cider"] == pytest.approx(single["cider"])
    records = _lines(out / "predictions.jsonl")
    singles = _lines(setup["single"] / "predictions.jsonl")
    assert len(records) == len(singles)
    for merged, alone in zip(records, singles):
        assert set(merged["models"]) == {"tiny", run}
        assert merged["models"][run]["prediction"] == alone["prediction"]
        assert merged["references"] == alone["references"] and merged["id"] == alone["id"]
    # Two differently initialised models caption differently: the columns are not copies of each other.
    assert any(r["models"]["tiny"]["prediction"] != r["models"][run]["prediction"] for r in records)


def test_run_directory_resolves_to_best(setup, tmp_path):
    assert cli.resolve_model(str(setup["run"])) == str(setup["run"] / "best")
    assert cli.resolve_model(str(setup["run"] / "best")) == str(setup["run"] / "best")
    assert cli.resolve_model("tiny") == "tiny"
    adapter = tmp_path / "adapter"
    (adapter / "best").mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    assert cli.resolve_model(str(adapter)) == str(adapter)


def test_repeated_model_gets_distinct_labels():
    assert cli.model_labels(["tiny", "a", "tiny", "tiny"]) == ["tiny", "a", "tiny#2", "tiny#3"]


def test_generation_flags_reach_generate(setup, monkeypatch):
    """Kills "eval sampling flags dropped" and "eval --repetition-penalty dropped" (tools/mutants.py): exit 0 and
    caption lengths alone did not notice `--sample --top-p --temperature --repetition-penalty` going missing."""
    from transformers import BlipForConditionalGeneration

    calls = []
    real_generate = BlipForConditionalGeneration.generate
    monkeypatch.setattr(BlipForConditionalGeneration, "generate",
                        lambda self, *args, **kwargs: calls.append(kwargs) or real_generate(self, *args, **kwargs))
    out = setup["root"] / "flags"
    assert cli.main(["-q", "eval", "--model", "tiny", "--data", str(setup["data"]), "--output", str(out),
                     "--num-beams", "2", "--min-new-tokens", "2", "--max-new-tokens", "2",
                     "--repetition-penalty", "1.3"]) == 0
    for record in _lines(out / "predictions.jsonl"):
        # Two word pieces decode to one or two words; without the cap the random model rambles on.
        assert 1 <= len(record["prediction"].split()) <= 2
    long = _lines(setup["single"] / "predictions.jsonl")
    assert any(len(r["prediction"].split()) > 2 for r in long)
    sampled = setup["root"] / "sampled"
    assert cli.main(["-q", "eval", "--model", "tiny", "--data", str(setup["data"]), "--output", str(sampled),
                     "--sample", "--top-p", "0.5", "--temperature", "0.7", *FAST]) == 0
    flagged, sampled_calls = calls[0], calls[-1]
    assert flagged["num_beams"] == 2 and flagged["repetition_penalty"] == 1.3 and not flagged.get("do_sample")
    assert flagged["min_new_tokens"] == flagged["max_new_tokens"] == 2
    assert sampled_calls["do_sample"] is True and sampled_calls["top_p"] == 0.5
    assert sampled_calls["temperature"] == 0.7


def test_repetition_penalty_changes_what_a_repeating_model_writes():
    """Kills "repetition penalty never passed to generate()" (tools/mutants.py) by its effect: a tiny model whose
    LM head favours "dog" (bias +1) writes it again and again greedily; a penalty of 2 makes it pick other words."""
    import torch
    from PIL import Image

    from captune.generate import GenerationOptions, caption_images

    model, processor = load_model_and_processor("tiny")
    model.eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[processor.tokenizer.convert_tokens_to_ids("dog")] = 1.0
    images = [Image.new("RGB", (64, 64), colour) for colour in ((200, 30, 30), (30, 160, 40))]
    plain, penalised = (caption_images(model, processor, images, GenerationOptions(
        num_beams=1, max_new_tokens=8, min_new_tokens=8, repetition_penalty=penalty)) for penalty in (1.0, 2.0))
    for repeated, varied in zip(plain, penalised):
        assert repeated.split().count("dog") >= 3 and varied.split().count("dog") < repeated.split().count("dog"), \
            (plain, penalised)


def test_bad_generation_flags_and_missing_model_are_one_line_errors(setup, capsys):
    data = str(setup["data"])
    assert cli.main(["eval", "--model", "tiny", "--data", data, "--output", str(setup["root"] / "x"),
                     "--min-new-tokens", "9", "--max-new-tokens", "3"]) != 0
    assert cli.main(["eval", "--model", "/no/such/model", "--model", "tiny", "--data", data,
                     "--output", str(setup["root"] / "y")]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(err) == 2 and all(line.startswith("captune: error:") for line in err)
    assert "min_new_tokens" in err[0] and "/no/such/model" in err[1]
    assert not (setup["root"] / "y").exists()


@pytest.mark.slow
def test_torchrun_two_processes_shard_and_match_one_process(setup):
    out = setup["root"] / "ddp"
    proc = torchrun(["-m", "captune", "eval", "--model", setup["run"], "--data", setup["data"], "--output", out, *FAST])
    # Only the main process prints and writes: two independent processes would print the table twice.
    assert proc.stdout.count("cider") == 1
    assert _lines(out / "predictions.jsonl") == _lines(setup["single"] / "predictions.jsonl")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cider"] == pytest.approx(json.loads((setup["single"] / "metrics.json").read_text())["cider"])
