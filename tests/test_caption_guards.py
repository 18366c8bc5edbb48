"""Guards against the classic captioning failures: repeat and collapse numbers, their warnings (eval, report, model
card), and the decoding options against repeats (config, CLI, captune.json, server) with their effect on generate()."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from fastapi.testclient import TestClient
from serve_fixtures import png_bytes

from captune import Captioner, cli
from captune.data.synthetic import make_synthetic
from captune.generate import GenerationOptions, caption_pixels
from captune.metrics import caption_guards, guard_warnings, has_repeat, score
from captune.model import load_model_and_processor
from captune.modelcard import model_card
from captune.report import write_report
from captune.train import save_model


@pytest.fixture(autouse=True)
def no_java(monkeypatch):
    monkeypatch.setattr("captune.metrics.shutil.which", lambda name: None)


def test_repeat_is_a_doubled_word_or_a_repeated_trigram_not_a_common_bigram():
    assert has_repeat("post post".split())
    assert has_repeat("a hat on top of a hat on top of".split())
    assert not has_repeat("a dog on a couch on a rug".split())  # "on a" twice is ordinary English
    assert not has_repeat([]) and not has_repeat(["dog"])


def test_guard_numbers():
    predictions = {"1": "A dog, a dog!", "2": "post post post", "3": "a dog a dog", "4": "A cat on a mat."}
    references = {"1": ["a dog"], "2": ["a post"], "3": ["a dog"], "4": ["a cat"]}
    guards = caption_guards(predictions, references)
    # "a dog a dog" has no doubled word and one trigram ("a dog a") once: not a repeat; "post post post" is.
    assert guards["repeated_ngram_rate"] == 1 / 4
    # Punctuation and case do not make captions distinct: "A dog, a dog!" == "a dog a dog".
    assert guards["distinct_captions"] == 3 / 4
    assert guards["distinct_references"] == 3 / 4
    assert guards["vocabulary"] == len({"a", "dog", "post", "cat", "on", "mat"})
    assert isinstance(guards["vocabulary"], int)
    scored = score(predictions, references, use_java=False)
    assert {k: scored[k] for k in guards} == guards


def test_warnings_name_the_failure_and_its_usual_cause():
    collapsed = {"distinct_captions": 0.1, "distinct_references": 1.0, "repeated_ngram_rate": 0.0}
    (warning,) = guard_warnings(collapsed, images=50)
    assert "collapsed" in warning and "learning rate" in warning
    repeating = {"distinct_captions": 1.0, "distinct_references": 1.0, "repeated_ngram_rate": 0.3}
    (warning,) = guard_warnings(repeating, images=50)
    assert "30%" in warning and "no_repeat_ngram_size" in warning
    # Healthy captions, too few images to judge, and a dataset whose images share captions (the synthetic shapes:
    # 36 scenes) are not flagged.
    assert guard_warnings({"distinct_captions": 0.9, "distinct_references": 1.0, "repeated_ngram_rate": 0.01}) == []
    assert guard_warnings(collapsed, images=3) == []
    assert guard_warnings({"distinct_captions": 0.3, "distinct_references": 0.36, "repeated_ngram_rate": 0.0}) == []


@pytest.fixture(scope="module")
def repeater():
    """The tiny model rigged to say "post" forever: its LM bias puts "post" first and [SEP] (end) a close second."""
    model, processor = load_model_and_processor("tiny", seed=0)
    tokenizer = processor.tokenizer
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        bias[tokenizer.convert_tokens_to_ids("post")] += 50
        bias[tokenizer.sep_token_id] += 49
    size = processor.image_processor.size["height"]
    return model.eval(), processor, torch.rand(2, 3, size, size)


def _generate(repeater, monkeypatch, **options) -> tuple[list[str], dict]:
    model, processor, pixels = repeater
    received = {}
    real = type(model).generate

    def spy(self, *args, **kwargs):
        received.update(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    return caption_pixels(model, processor, pixels, GenerationOptions(max_new_tokens=8, **options)), received


def test_each_option_reaches_generate_and_changes_the_caption(repeater, monkeypatch):
    plain, received = _generate(repeater, monkeypatch)
    assert plain == ["post " * 7 + "post"] * 2
    assert "length_penalty" not in received  # greedy: a beam-only option is not passed

    captions, received = _generate(repeater, monkeypatch, no_repeat_ngram_size=1)
    assert received["no_repeat_ngram_size"] == 1 and captions == ["post"] * 2

    captions, received = _generate(repeater, monkeypatch, repetition_penalty=5.0)
    assert received["repetition_penalty"] == 5.0 and captions == ["post"] * 2

    short, received = _generate(repeater, monkeypatch, num_beams=3, length_penalty=-3.0)
    assert received["length_penalty"] == -3.0
    long, received = _generate(repeater, monkeypatch, num_beams=3, length_penalty=3.0)
    assert received["length_penalty"] == 3.0
    # "post" is 73% likely at each step, the end 27%: dividing by length**3 rewards the longest beam, by length**-3
    # the shortest.
    assert [len(c.split()) for c in long] == [8, 8] and all(len(c.split()) <= 1 for c in short)


def test_bad_option_values_are_refused():
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        GenerationOptions(no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        GenerationOptions(repetition_penalty=0)


def test_options_go_from_training_flags_to_captune_json_and_back(tmp_path, capsys):
    data = make_synthetic(tmp_path / "data", n_train=4, n_val=1)
    (data / "validation").rename(tmp_path / "unused")  # train-only: no captioning in the run, seconds
    run = tmp_path / "run"
    assert cli.main(["-q", "train", "--data", str(data), "--model", "tiny", "--output", str(run), "--max-steps", "1",
                     "--batch-size", "4", "--num-workers", "0", "--report-to", "none",
                     "--no-repeat-ngram-size", "3", "--repetition-penalty", "1.3", "--length-penalty", "0.8"]) == 0
    recorded = json.loads((run / "best" / "captune.json").read_text())["generation"]
    assert (recorded["no_repeat_ngram_size"], recorded["repetition_penalty"], recorded["length_penalty"]) == (3, 1.3, 0.8)
    defaults = Captioner.load(run / "best", device="cpu").defaults
    assert (defaults.no_repeat_ngram_size, defaults.repetition_penalty, defaults.length_penalty) == (3, 1.3, 0.8)
    # caption/eval take the recorded values unless a flag says otherwise.
    parser = cli.build_parser()
    saved = {"generation": recorded}
    options = cli.generation_options(parser.parse_args(["caption", "--model", "m", "x.png"]), saved)
    assert (options.no_repeat_ngram_size, options.repetition_penalty, options.length_penalty) == (3, 1.3, 0.8)
    options = cli.generation_options(parser.parse_args(["eval", "--model", "m", "--data", "d", "--output", "o",
                                                        "--no-repeat-ngram-size", "0"]), saved)
    assert options.no_repeat_ngram_size == 0 and options.repetition_penalty == 1.3
    # The model card's plain-transformers snippet decodes the same way.
    card = (run / "best" / "README.md").read_text()
    assert "no_repeat_ngram_size=3" in card and "repetition_penalty=1.3" in card
    assert cli.main(["train", "--data", str(data), "--model", "tiny", "--output", str(tmp_path / "bad"),
                     "--no-repeat-ngram-size", "-2"]) != 0
    assert "no_repeat_ngram_size" in capsys.readouterr().err


def test_server_page_and_api_take_the_options(tmp_path):
    from captune.serve import create_app

    model, processor = load_model_and_processor("tiny", seed=0)
    save_model(model, processor, tmp_path / "best", {"generation": {"num_beams": 2, "no_repeat_ngram_size": 2,
                                                                    "length_penalty": 1.5}})
    captioner = Captioner.load(tmp_path / "best", device="cpu", max_new_tokens=4)
    with TestClient(create_app(captioner)) as client:
        page = client.get("/").text
        for name in ("repetition_penalty", "no_repeat_ngram_size", "length_penalty"):
            assert f'id="{name}"' in page
        defaults = json.loads(page.split("const DEFAULTS = ")[1].split(";")[0])
        assert (defaults["no_repeat_ngram_size"], defaults["length_penalty"]) == (2, 1.5)
        reply = client.post("/v1/caption", files=[("images", ("a.png", png_bytes(), "image/png"))],
                            data={"no_repeat_ngram_size": "1", "length_penalty": "0.5", "repetition_penalty": "2"})
        assert reply.status_code == 200, reply.text
        options = reply.json()["options"]
        assert (options["no_repeat_ngram_size"], options["length_penalty"], options["repetition_penalty"]) == (1, 0.5, 2)
    parsed = cli.build_parser().parse_args(["serve", "--model", "m", "--no-repeat-ngram-size", "3"])
    assert parsed.no_repeat_ngram_size == 3 and parsed.length_penalty is None


def test_eval_reports_the_guards_and_warns_on_collapse(tmp_path, caplog):
    """The untrained tiny model says nearly the same thing for every image: eval must say so."""
    data = make_synthetic(tmp_path / "data", n_train=1, n_val=8)
    with caplog.at_level(logging.WARNING, logger="captune"):
        assert cli.main(["-q", "eval", "--model", "tiny", "--data", str(data), "--output", str(tmp_path / "out"),
                         "--max-new-tokens", "4"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["distinct_captions"] <= 2 / 8 and metrics["vocabulary"] >= 1
    assert any("collapsed" in r.getMessage() and "learning rate" in r.getMessage() for r in caplog.records)


def test_report_and_model_card_warn_in_words(tmp_path):
    collapsed = {"cider": 0.1, "distinct_captions": 0.05, "distinct_references": 1.0, "repeated_ngram_rate": 0.4,
                 "vocabulary": 3}
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "split": "validation", **collapsed}) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 5, "best_step": 5, "final_metrics": collapsed,
                                                       "data": {"validation_images": 40}}))
    page = write_report(tmp_path).read_text()
    assert page.count("class=warning") == 2 and "learning rate" in page and "repeat words" in page
    card = model_card(base_model="tiny", data={"validation_images": 40}, hyperparameters={}, metrics=collapsed,
                      generation={"num_beams": 1})
    assert "| vocabulary | 3 |" in card and "**Warning.**" in card and "collapsed" in card
    healthy = {**collapsed, "distinct_captions": 1.0, "repeated_ngram_rate": 0.0}
    assert "Warning" not in model_card(base_model="tiny", data={"validation_images": 40}, hyperparameters={},
                                       metrics=healthy, generation={"num_beams": 1})
