"""Florence-2's quirks: the task prompt as encoder input, decoder labels shifted once (as the model shifts them),
the image token surviving a save/reload, image_seq_length equal to the vision tower's output, and a saved best/
captioning the same with plain transformers as with captune."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch
from PIL import Image

from captune import models
from captune.cli import main
from captune.data.synthetic import make_synthetic
from captune.errors import CaptuneError
from captune.generate import GenerationOptions, caption_images
from captune.model import load_model_and_processor
from captune.models.common import IGNORE_INDEX, mean_loss

# Every run here is in-process and no test reads a Java-only metric: scored without Java (see conftest's no_java).
pytestmark = pytest.mark.usefixtures("no_java")

PRESET = "tiny-florence2"


@pytest.fixture(scope="module")
def florence():
    return models.family_module("florence2")


@pytest.fixture(scope="module")
def tiny_florence():
    return load_model_and_processor(PRESET, seed=0)


def _images():
    red = Image.new("RGB", (64, 64), (220, 30, 30))
    stripes = Image.new("RGB", (64, 64), (255, 255, 255))
    for x in range(0, 64, 8):
        stripes.paste((0, 0, 200), (x, 0, x + 4, 64))
    return red, stripes


def test_preset_is_the_real_class_and_image_seq_length_is_the_vision_output(florence, tiny_florence):
    model, processor = tiny_florence
    assert type(model).__name__ == "Florence2ForConditionalGeneration"
    assert models.family_of(model) is florence and models.family_of_processor(processor) is florence
    features = model.get_image_features(florence.pixel_values(processor, list(_images()))).pooler_output
    assert features.shape[1] == processor.num_image_tokens == florence.vision_seq_length(model.config, 64)
    full = type(model.config)()  # the real checkpoints' architecture: 768 px -> 24 x 24 + 1
    assert florence.vision_seq_length(full, 768) == 577


def test_encoder_input_is_the_processors_task_prompt_and_labels_are_decoder_targets(florence, tiny_florence):
    model, processor = tiny_florence
    images = list(_images())
    for prompt, task in (("", "<CAPTION>"), ("<DETAILED_CAPTION>", "<DETAILED_CAPTION>")):
        batch = florence.tokenize(processor, ["two red circles", "a dog"], prompt=prompt, max_tokens=40)
        reference = processor(text=[task] * 2, images=images, return_tensors="pt")
        assert torch.equal(batch["input_ids"], reference["input_ids"])
        assert torch.equal(batch["attention_mask"], reference["attention_mask"])
    assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == [processor.num_image_tokens] * 2
    labels, tokenizer = batch["labels"], processor.tokenizer
    # <s> caption </s>, -100 only at padding (the shorter caption's tail).
    assert labels[0].tolist() == tokenizer("two red circles")["input_ids"]
    assert labels[0, 0] == tokenizer.bos_token_id and (labels[1] == IGNORE_INDEX).sum() == labels.shape[1] - len(
        tokenizer("a dog")["input_ids"])
    # One shift, exactly the model's own: decoder inputs start from what generate() starts decoding from.
    from transformers.models.florence2.modeling_florence2 import shift_tokens_right

    text = model.config.text_config
    assert torch.equal(batch["decoder_input_ids"],
                       shift_tokens_right(labels, text.pad_token_id, text.decoder_start_token_id))
    start = florence.start_token_id(processor)
    assert (batch["decoder_input_ids"][:, 0] == start).all()
    output = model.generate(**processor(text=["<CAPTION>"] * 2, images=images, return_tensors="pt"), max_new_tokens=2)
    assert (output[:, 0] == start).all()
    # Truncation keeps the end token; an empty caption still tokenizes (the placeholder row).
    short = florence.tokenize(processor, ["one two three four five six seven"], prompt="", max_tokens=4)
    assert short["labels"].shape[1] == 4 and short["labels"][0, -1] == tokenizer.eos_token_id
    assert florence.tokenize(processor, [""], prompt="", max_tokens=8)["labels"].shape == (1, 2)


def test_loss_equals_the_models_own_and_depends_on_the_image(florence, tiny_florence):
    model, processor = tiny_florence
    model.eval()
    red, stripes = _images()
    batch = florence.tokenize(processor, ["two red circles", "a dog"], prompt="", max_tokens=40)
    batch["pixel_values"] = florence.pixel_values(processor, [red, stripes])
    with torch.no_grad():
        ours = mean_loss(florence, model, batch)
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
        assert torch.allclose(ours, theirs, atol=1e-5)
        same = florence.tokenize(processor, ["two red circles"] * 2, prompt="", max_tokens=40)
        losses = [mean_loss(florence, model, {**same, "pixel_values": florence.pixel_values(processor, [image] * 2)})
                  for image in (red, stripes)]
    assert abs(losses[0].item() - losses[1].item()) > 1e-4  # the model sees the image


def test_save_reload_keeps_the_image_token_and_a_broken_checkpoint_is_refused(florence, tiny_florence, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = tiny_florence
    model.save_pretrained(tmp_path / "ok")
    processor.save_pretrained(tmp_path / "ok")
    plain_processor = AutoProcessor.from_pretrained(tmp_path / "ok")
    assert plain_processor.tokenizer.image_token == "<image>"
    assert plain_processor.image_token_id == model.config.image_token_id
    assert plain_processor.num_image_tokens == processor.num_image_tokens
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "ok")
    reloaded, _ = load_model_and_processor(str(tmp_path / "ok"))
    for other in (plain, reloaded):
        theirs = other.state_dict()
        assert all(torch.equal(value, theirs[name]) for name, value in model.state_dict().items())

    wrong = tmp_path / "wrong_length"
    shutil.copytree(tmp_path / "ok", wrong)
    config = json.loads((wrong / "processor_config.json").read_text())
    config["image_processor"]["image_seq_length"] = 577
    (wrong / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(CaptuneError, match="image_seq_length is 577 but the vision tower gives 65"):
        load_model_and_processor(str(wrong))

    lost = tmp_path / "no_image_token"
    shutil.copytree(tmp_path / "ok", lost)
    config = json.loads((lost / "tokenizer_config.json").read_text())
    config.pop("image_token")  # what a tokenizer given image_token as a plain attribute saves
    (lost / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CaptuneError, match="image_token"):
        load_model_and_processor(str(lost))


def test_generate_decodes_from_the_task_prompt_with_the_processors_post_processing(florence, tiny_florence):
    model, processor = tiny_florence
    pixels = florence.pixel_values(processor, list(_images()))
    # Rig the LM head so the untrained model writes one token over and over: captions are then non-empty.
    word = processor.tokenizer.convert_tokens_to_ids("red")
    with torch.no_grad():
        bias = torch.zeros(model.config.text_config.vocab_size)
        bias[word] = 50.0
        model.lm_head.bias = torch.nn.Parameter(bias)
        try:
            captions = florence.generate(model, processor, pixels, GenerationOptions(max_new_tokens=4))
            detailed = florence.generate(model, processor, pixels,
                                         GenerationOptions(max_new_tokens=4, prompt="<DETAILED_CAPTION>"))
        finally:
            model.lm_head.bias = None
    # 4 new tokens: three words, then the </s> BART's forced_eos_token_id puts at the length limit.
    assert captions == ["redredred"] * 2 == detailed
    assert not any("<" in c for c in captions)


def test_modes_train_what_they_say(florence):
    from captune.finetune import apply_mode

    model, _ = load_model_and_processor(PRESET)
    florence.set_trainable(model, "frozen-vision")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("model.vision_tower.") for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if "multi_modal_projector" in n)
    lora = apply_mode(load_model_and_processor(PRESET)[0], "lora", lora_targets=None)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ("q_proj" in n or "v_proj" in n) and "language_model" in n
                             for n in trainable)
    assert any("encoder_attn" in n for n in trainable) and any(".encoder." in n for n in trainable)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short tiny-florence2 run through the CLI: 6 steps, best/ saved. Decoding forbids repeated tokens, so the
    briefly trained model writes words rather than <s> over and over (special tokens are skipped in captions)."""
    root = tmp_path_factory.mktemp("florence2")
    data = make_synthetic(root / "data", n_train=16, n_val=4)
    out = root / "run"
    assert main(["-q", "train", "--model", PRESET, "--data", str(data), "--output", str(out), "--epochs", "3",
                 "--batch-size", "8", "--lr", "1e-2", "--num-workers", "0", "--report-to", "none",
                 "--set", "eval.max_new_tokens=6", "--set", "eval.min_new_tokens=4",
                 "--set", "eval.no_repeat_ngram_size=1"]) == 0
    return out


def test_saved_best_captions_the_same_with_plain_transformers_as_captune_caption(run, capsys):
    best = run / "best"
    image = sorted((run.parent / "data" / "validation").glob("*.png"))[0]
    capsys.readouterr()
    assert main(["-q", "caption", "--model", str(best), str(image)]) == 0
    ours = capsys.readouterr().out.strip()
    assert len(ours.split()) >= 2  # min_new_tokens 4: <s> and at least three tokens of caption
    card = (best / "README.md").read_text(encoding="utf-8")
    snippet = card.split("```python\n")[1].split("```")[0]
    snippet = snippet.replace('"path/to/this/directory"', repr(str(best))).replace('"photo.jpg"', repr(str(image)))
    assert "captune" not in snippet and "AutoProcessor" in snippet
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md", "exec"), {})
    assert ours == printed.getvalue().strip()
    settings = json.loads((best / "captune.json").read_text())
    assert settings["base_model"] == PRESET and settings["generation"]["min_new_tokens"] == 4
    # Plain AutoModelForImageTextToText + AutoProcessor, decoded the documented way, agree as well.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(best).eval()
    processor = AutoProcessor.from_pretrained(best)
    expected = caption_images(model, processor, [Image.open(image)], GenerationOptions(**settings["generation"]))
    assert printed.getvalue().strip() == expected[0]


LONG = ("a wide view of a busy city street in the late afternoon with many people walking along the sidewalk next "
        "to tall buildings while cars buses and a few bicycles wait at the traffic light and a man in a blue jacket "
        "holds an umbrella near the corner where a small dog sits beside a bench under a large tree with green "
        "leaves and a red sign on the wall behind it")  # 72 words: what <MORE_DETAILED_CAPTION> writes


def test_check_counts_captions_the_family_limit_truncates(tmp_path, capsys):
    data = make_synthetic(tmp_path / "data", n_train=4, n_val=1)
    rows = (data / "train" / "metadata.jsonl").read_text().splitlines()
    rows[0] = json.dumps({"file_name": json.loads(rows[0])["file_name"], "text": LONG})
    (data / "train" / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    reports = {}
    for model in ("tiny", PRESET):
        assert main(["check", str(data), "--model", model, "--json"]) == 0
        reports[model] = json.loads(capsys.readouterr().out)["caption_tokens"]
    # BLIP's 40 tokens cut the long caption; Florence-2's default (320) holds it, counted as <s> caption </s>.
    assert reports["tiny"]["max_caption_tokens"] == 40 and reports["tiny"]["truncated"] == 1
    florence = reports[PRESET]
    assert florence["max_caption_tokens"] == 320 and florence["truncated"] == 0
    tokenizer = models.family_module("florence2").preset_tokenizer(PRESET)
    assert florence["max"] == len(tokenizer(LONG)["input_ids"]) > 40
    assert main(["check", str(data), "--model", PRESET, "--max-caption-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert "1 over max_caption_tokens=10 (tiny-florence2's tokens; training truncates them)" in out


def test_long_captions_are_shown_whole_in_a_wide_scrolling_card(tmp_path):
    from captune import report

    short = {"id": "a.png", "image": None, "prediction": "two red circles", "references": ["two red circles"]}
    long = {"id": "b.png", "image": None, "prediction": LONG, "references": [LONG], "cider": 1.5}
    html = report._card(long, short, long, {}, ("base model", "best/"))
    assert html.startswith("<div class='card wide'>") and "(72 words)" in html
    assert f"<span class=long>{LONG}</span>" in html  # the whole caption, never cut
    assert report._card(short, None, short, {}, ("base model", "best/")).startswith("<div class=card>")
    assert ".long{display:block;max-height:12em;overflow:auto" in report._CSS


# BLIP-2's rows also hold its image placeholders, which its caption_lengths leaves out: not a row length there.
@pytest.mark.parametrize("preset", ["tiny", "tiny-git", PRESET])
def test_caption_lengths_are_the_untruncated_training_rows(preset):
    """What `captune check` counts is what `tokenize` would build without the limit, for every family."""
    family = models.family_for(preset)
    _, processor = load_model_and_processor(preset)
    captions = ["two red circles", LONG]
    for prompt in ("", "a picture of"):
        counted = family.caption_lengths(family.preset_tokenizer(preset), captions, prompt)
        rows = [family.tokenize(processor, [c], prompt=prompt, max_tokens=1000) for c in captions]
        if "decoder_input_ids" in rows[0]:  # an encoder-decoder's rows are its decoder targets
            assert counted == [r["labels"].shape[1] for r in rows]
        else:
            assert counted == [r["input_ids"].shape[1] for r in rows]


def test_lora_run_merges_exports_and_captions_as_the_adapter(tmp_path):
    from transformers import Florence2ForConditionalGeneration

    data = make_synthetic(tmp_path / "data", n_train=16, n_val=2)
    run = tmp_path / "run"
    assert main(["-q", "train", "--data", str(data), "--model", PRESET, "--output", str(run), "--mode", "lora",
                 "--max-steps", "3", "--batch-size", "8", "--lr", "5e-2", "--num-workers", "0", "--report-to", "none",
                 "--set", "train.lora_rank=4", "--set", "eval.max_new_tokens=5",
                 "--set", "eval.no_repeat_ngram_size=1"]) == 0
    assert (run / "last" / "adapter_config.json").is_file() and not (run / "last" / "model.safetensors").exists()
    adapted, processor = load_model_and_processor(str(run / "last"))
    assert isinstance(adapted, Florence2ForConditionalGeneration)  # merged, no peft wrapper left
    base, _ = load_model_and_processor(PRESET, seed=42)
    layer = "model.language_model.decoder.layers.0.encoder_attn"
    assert not torch.equal(adapted.state_dict()[f"{layer}.q_proj.weight"], base.state_dict()[f"{layer}.q_proj.weight"])
    assert torch.equal(adapted.state_dict()[f"{layer}.k_proj.weight"], base.state_dict()[f"{layer}.k_proj.weight"])
    images = [Image.open(p).convert("RGB") for p in sorted((data / "validation").glob("*.png"))]
    options = GenerationOptions(max_new_tokens=5, no_repeat_ngram_size=1)
    captions = caption_images(adapted.eval(), processor, images, options)
    assert main(["-q", "export", str(run / "last"), "--output", str(tmp_path / "exported")]) == 0
    plain = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "exported").eval()
    assert caption_images(plain, processor, images, options) == captions
