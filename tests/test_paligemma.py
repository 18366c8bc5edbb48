"""PaliGemma's quirks: prefix-LM rows as PaliGemmaProcessor's `suffix=` builds them (image placeholders, <bos>, the
"caption en" prefix and "\\n" masked, token_type_ids passed on), image_seq_length set from the vision tower where a
saved processor lacks it, and a saved best/ captioning the same with plain transformers as with captune."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch
from PIL import Image

from captune import models
from captune.captioner import Captioner
from captune.cli import main
from captune.data.synthetic import make_synthetic
from captune.errors import CaptuneError
from captune.generate import GenerationOptions, caption_images
from captune.model import load_model_and_processor
from captune.models.common import IGNORE_INDEX, mean_loss

PRESET = "tiny-paligemma"


@pytest.fixture(scope="module")
def pali():
    return models.family_module("paligemma")


@pytest.fixture(scope="module")
def tiny_pali():
    model, processor = load_model_and_processor(PRESET, seed=0)
    return model.eval(), processor


def _images():
    red = Image.new("RGB", (64, 64), (220, 30, 30))
    stripes = Image.new("RGB", (64, 64), (255, 255, 255))
    for x in range(0, 64, 8):
        stripes.paste((0, 0, 200), (x, 0, x + 4, 64))
    return red, stripes


def test_preset_is_the_real_class_and_image_seq_length_is_the_vision_output(pali, tiny_pali):
    model, processor = tiny_pali
    assert type(model).__name__ == "PaliGemmaForConditionalGeneration"
    assert type(processor).__name__ == "PaliGemmaProcessor"
    assert models.family_of(model) is pali and models.family_of_processor(processor) is pali
    assert models.family_defaults("google/paligemma-3b-pt-224")["train.lr"] == 1e-5
    features = model.get_image_features(pali.pixel_values(processor, list(_images()))).pooler_output
    assert features.shape[1] == processor.image_seq_length == pali.image_tokens(model) == 64
    full = pali.full_size_config()  # paligemma-3b-pt-224: 224 px / 14-px patches = 256 image tokens
    vision = full.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 == 256 == full.text_config.num_image_tokens


def test_rows_equal_the_processors_suffix_rows_and_labels_mask_all_but_the_caption(pali, tiny_pali):
    model, processor = tiny_pali
    captions = ["two red circles", "a dog"]
    batch = pali.tokenize(processor, captions, prompt="", max_tokens=32)
    reference = processor(images=list(_images()), text=["<image>caption en"] * 2, suffix=captions,
                          return_tensors="pt", padding="longest", padding_side="right")
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert torch.equal(batch[key], reference[key]), key
    tokenizer, n = processor.tokenizer, processor.image_seq_length
    ids, labels = batch["input_ids"], batch["labels"]
    assert (ids[:, :n] == model.config.image_token_id).all() and (labels[:, :n] == IGNORE_INDEX).all()
    # The first text token is <bos>, the start token; <bos> "caption en" "\n" are all -100.
    assert pali.start_token_id(processor) == tokenizer.bos_token_id and (ids[:, n] == tokenizer.bos_token_id).all()
    prefix = len(pali.prefix_ids(tokenizer, ""))
    assert tokenizer.decode(ids[0, n:n + prefix]) == "<bos>caption en\n"
    assert (labels[:, :n + prefix] == IGNORE_INDEX).all()
    # The caption and <eos> are labels (unshifted), padding is -100.
    first = tokenizer("two red circles<eos>", add_special_tokens=False)["input_ids"]
    assert labels[0, n + prefix:].tolist() == first
    short = tokenizer("a dog<eos>", add_special_tokens=False)["input_ids"]
    assert labels[1, n + prefix:n + prefix + len(short)].tolist() == short
    assert (labels[1, n + prefix + len(short):] == IGNORE_INDEX).all() and (batch["attention_mask"][1, -1] == 0)
    # What generate() continues from is exactly the training row up to the first label.
    prompt = pali.generation_inputs(processor, 2, "")
    assert torch.equal(prompt["input_ids"], ids[:, :n + prefix])
    assert torch.equal(prompt["token_type_ids"], batch["token_type_ids"][:, :n + prefix])
    plain = processor(images=list(_images()), text=["<image>caption en"] * 2, return_tensors="pt")
    assert torch.equal(plain["input_ids"], prompt["input_ids"])
    # Another prefix, truncation keeping <eos>, and the empty placeholder caption.
    spanish = pali.tokenize(processor, ["a dog"], prompt="caption es", max_tokens=32)
    assert tokenizer.decode(spanish["input_ids"][0, n:]).startswith("<bos>caption es\n")
    cut = pali.tokenize(processor, ["one two three four five six seven"], prompt="", max_tokens=prefix + 3)
    assert cut["input_ids"].shape[1] == n + prefix + 3 and cut["labels"][0, -1] == tokenizer.eos_token_id
    empty = pali.tokenize(processor, [""], prompt="", max_tokens=32)
    assert empty["labels"][0, -1] == tokenizer.eos_token_id and pali.target_tokens(empty) == 1
    with pytest.raises(ValueError, match="max_caption_tokens"):
        pali.tokenize(processor, ["a dog"], prompt="", max_tokens=prefix)
    # What `captune check` counts: the untruncated row's text positions (the placeholders come on top).
    for prompt in ("", "caption es"):
        rows = [pali.tokenize(processor, [c], prompt=prompt, max_tokens=1000) for c in captions]
        assert pali.caption_lengths(pali.preset_tokenizer(PRESET), captions, prompt) == [
            r["input_ids"].shape[1] - n for r in rows]


def test_loss_equals_the_models_own_and_depends_on_the_image_and_the_prefix_block(pali, tiny_pali):
    model, processor = tiny_pali
    red, stripes = _images()
    batch = pali.tokenize(processor, ["two red circles", "a dog"], prompt="", max_tokens=32)
    batch["pixel_values"] = pali.pixel_values(processor, [red, stripes])
    with torch.no_grad():
        ours = mean_loss(pali, model, batch)
        theirs = model(**batch).loss  # the model's own shifted loss over the processor's labels
        assert torch.allclose(ours, theirs, atol=1e-5)
        assert pali.sequence_nll(model, batch).sum() == pytest.approx(
            pali.loss_sum(model, batch, label_smoothing=0.0).item(), rel=1e-5)
        same = pali.tokenize(processor, ["two red circles"] * 2, prompt="", max_tokens=32)
        losses = [mean_loss(pali, model, {**same, "pixel_values": pali.pixel_values(processor, [image] * 2)})
                  for image in (red, stripes)]
        assert abs(losses[0].item() - losses[1].item()) > 1e-4  # the model sees the image
        # token_type_ids reach the forward: without them the image and prefix would attend causally.
        causal = model(**{k: v for k, v in batch.items() if k not in ("token_type_ids", "labels")}).logits
        assert not torch.allclose(causal, model(**{k: v for k, v in batch.items() if k != "labels"}).logits)


def test_image_seq_length_none_fails_late_in_transformers_and_is_set_on_load(pali, tiny_pali, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor, PaliGemmaProcessor

    model, processor = tiny_pali
    # The trap: the image processor's default image_seq_length None builds a processor that fails when called.
    broken = PaliGemmaProcessor(image_processor=pali.image_processor(64, None), tokenizer=processor.tokenizer)
    with pytest.raises(TypeError):
        broken(images=[_images()[0]], text="<image>caption en")
    with pytest.raises(CaptuneError, match="image_seq_length None"):
        pali.tokenize(broken, ["a dog"], prompt="", max_tokens=32)

    model.save_pretrained(tmp_path / "ok")
    processor.save_pretrained(tmp_path / "ok")
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "ok")
    plain_processor = AutoProcessor.from_pretrained(tmp_path / "ok")
    assert plain_processor.image_seq_length == 64 and plain_processor.image_token_id == model.config.image_token_id
    assert len(plain_processor.tokenizer) == len(processor.tokenizer) == model.config.text_config.vocab_size
    reloaded, reloaded_processor = load_model_and_processor(str(tmp_path / "ok"))
    for other in (plain, reloaded):
        theirs = other.state_dict()
        assert all(torch.equal(value, theirs[name]) for name, value in model.state_dict().items())
    assert torch.equal(pali.tokenize(reloaded_processor, ["a dog"], prompt="", max_tokens=32)["input_ids"],
                       pali.tokenize(processor, ["a dog"], prompt="", max_tokens=32)["input_ids"])

    config_file = next(f for f in ("processor_config.json", "preprocessor_config.json")
                       if (tmp_path / "ok" / f).is_file())
    for name, value in (("unset", None), ("wrong", 256)):
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        config = json.loads((tmp_path / name / config_file).read_text())
        holder = config.get("image_processor", config)
        if value is None:
            holder.pop("image_seq_length")
        else:
            holder["image_seq_length"] = value
        (tmp_path / name / config_file).write_text(json.dumps(config))
    _, repaired = load_model_and_processor(str(tmp_path / "unset"))
    assert repaired.image_seq_length == 64
    assert repaired(images=[_images()[0]], text="<image>caption en", return_tensors="pt")["input_ids"].shape[1] == (
        64 + len(pali.prefix_ids(repaired.tokenizer, "")))
    with pytest.raises(CaptuneError, match="image_seq_length is 256 but the vision tower gives 64"):
        load_model_and_processor(str(tmp_path / "wrong"))


def test_generate_takes_the_prefix_rows_and_returns_the_caption_alone(pali, tiny_pali):
    model, processor = tiny_pali
    pixels = pali.pixel_values(processor, list(_images()))
    # Rig the LM head so the untrained model writes one word over and over: captions are then non-empty.
    word = processor.tokenizer.convert_tokens_to_ids("red")
    bias = torch.zeros(model.config.text_config.vocab_size)
    bias[word] = 1e4
    hook = model.lm_head.register_forward_hook(lambda module, args, output: output + bias)
    try:
        greedy = pali.generate(model, processor, pixels, GenerationOptions(max_new_tokens=3))
        beams = pali.generate(model, processor, pixels, GenerationOptions(max_new_tokens=3, num_beams=2,
                                                                          prompt="caption es"))
    finally:
        hook.remove()
    assert greedy == ["redredred"] * 2 == beams  # no prefix, no "\n", no special tokens


def test_modes_train_what_they_say(pali):
    from captune.finetune import apply_mode

    model, _ = load_model_and_processor(PRESET)
    pali.set_trainable(model, "frozen-vision")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("model.vision_tower.") for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if "multi_modal_projector" in n)
    with pytest.raises(CaptuneError, match="frozen-lm"):
        pali.set_trainable(model, "frozen-lm")
    lora = apply_mode(load_model_and_processor(PRESET)[0], "lora", lora_targets=None)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n and "self_attn" in n for n in trainable)
    assert {n.split("self_attn.")[1].split(".")[0] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    import re

    pattern = pali.lora_pattern(["q_proj", "down_proj"], vision=True)
    names = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    assert any("vision_tower" in n and n.endswith("q_proj") for n in names)
    assert any(n.endswith("mlp.down_proj") for n in names)


def test_speed_levers_keep_the_numbers(pali):
    from captune.speed import disable_sdpa, enable_sdpa, quantize_int8, share_images

    model, processor = load_model_and_processor(PRESET, seed=0, sdpa=False)
    model.eval()
    red, stripes = _images()
    batch = pali.tokenize(processor, ["two red circles", "a dog"], prompt="", max_tokens=32)
    batch["pixel_values"] = pali.pixel_values(processor, [red, stripes])
    options = GenerationOptions(num_beams=2, max_new_tokens=4)
    with torch.no_grad():
        eager_loss = mean_loss(pali, model, batch)
        eager = pali.generate(model, processor, batch["pixel_values"], options)
        assert enable_sdpa(model) == 4  # 2 Gemma + 2 SigLIP attentions
        assert torch.allclose(mean_loss(pali, model, batch), eager_loss, atol=1e-5)
        assert pali.generate(model, processor, batch["pixel_values"], options) == eager
        three = pali.tokenize(processor, ["two red circles", "a dog", "a cat"], prompt="", max_tokens=32)
        repeated = mean_loss(pali, model, {**three, "pixel_values": pali.pixel_values(processor, [red, red, stripes])})
        with share_images(pali.vision_tower(model), torch.tensor([0, 0, 1])):
            grouped = mean_loss(pali, model, {**three, "pixel_values": batch["pixel_values"]})
        assert torch.allclose(grouped, repeated, atol=1e-5)
    disable_sdpa(model)
    assert model.config._attn_implementation == "eager"
    quantize_int8(model)
    assert len(pali.generate(model, processor, batch["pixel_values"], options)) == 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("paligemma_data"), n_train=16, n_val=4, seed=5)


@pytest.fixture(scope="module")
def no_java():
    """Score with captune's Java-less fallback: METEOR and the PTB tokeniser's JVMs (10-25 s a call on the shared
    test machine) are family-independent and tested in test_metrics.py; here they would only add their start-up to
    every command (as tests/test_learning.py does)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("captune.metrics.shutil.which", lambda name: None)
        yield


@pytest.fixture(scope="module")
def run(data, tmp_path_factory, no_java):
    """A short tiny-paligemma run through the CLI: 4 steps, best/ saved. Decoding forbids repeated tokens, so the
    briefly trained model writes words rather than one token over and over."""
    out = tmp_path_factory.mktemp("paligemma") / "run"
    assert main(["-q", "train", "--model", PRESET, "--data", str(data), "--output", str(out), "--epochs", "2",
                 "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-2", "--num-workers", "0", "--report-to", "none",
                 "--set", "eval.max_new_tokens=6", "--set", "eval.min_new_tokens=3",
                 "--set", "eval.no_repeat_ngram_size=1"]) == 0
    return out


def test_saved_best_captions_the_same_with_plain_transformers_as_captune_caption(run, data, capsys):
    best = run / "best"
    images = sorted((data / "validation").glob("*.png"))[:2]
    capsys.readouterr()
    assert main(["-q", "caption", "--model", str(best), *map(str, images)]) == 0
    ours = capsys.readouterr().out.strip().splitlines()
    assert all(len(c) > 0 and "caption en" not in c for c in ours)
    settings = json.loads((best / "captune.json").read_text())
    assert settings["base_model"] == PRESET and settings["generation"]["min_new_tokens"] == 3
    # The model card's plain-transformers snippet prints the same caption.
    card = (best / "README.md").read_text(encoding="utf-8")
    assert "PaliGemmaForConditionalGeneration" in card
    snippet = card.split("```python\n")[1].split("```")[0]
    snippet = snippet.replace('"path/to/this/directory"', repr(str(best))).replace('"photo.jpg"', repr(str(images[0])))
    assert "captune" not in snippet and "AutoModelForImageTextToText" in snippet
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md", "exec"), {})
    assert printed.getvalue().strip() == ours[0]
    # Plain AutoModelForImageTextToText + AutoProcessor through captune's decoding, and Captioner, agree as well.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(best).eval()
    processor = AutoProcessor.from_pretrained(best)
    pil = [Image.open(p).convert("RGB") for p in images]
    assert caption_images(model, processor, pil, GenerationOptions(**settings["generation"])) == ours
    captioner = Captioner.load(best, device="cpu")
    assert captioner.caption([str(p) for p in images]) == ours
    from fastapi.testclient import TestClient

    from captune.serve import create_app

    with TestClient(create_app(captioner)) as client:  # `captune serve`'s app
        reply = client.post("/v1/caption", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in images])
    assert reply.status_code == 200, reply.text
    assert [c["caption"] for c in reply.json()["captions"]] == ours


def test_eval_report_and_export_work_on_a_paligemma_run(run, data, tmp_path, no_java):
    from transformers import PaliGemmaForConditionalGeneration

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"][-1] == 4  # 16 pairs / (4 x 2) a step, 2 epochs
    out = tmp_path / "eval"
    assert main(["-q", "eval", "--model", str(run / "best"), "--data", str(data), "--output", str(out),
                 "--max-new-tokens", "5"]) == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    assert "cider" in json.loads((out / "metrics.json").read_text())
    assert main(["-q", "report", str(run)]) == 0 and (run / "report.html").is_file()
    assert main(["-q", "export", str(run), "--output", str(tmp_path / "exported")]) == 0
    assert isinstance(PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "exported"),
                      PaliGemmaForConditionalGeneration)


def test_lora_run_resumes_exactly_and_reloads_merged(data, tmp_path, monkeypatch):
    from test_exact_resume import assert_resume_is_exact, train_only
    from transformers import PaliGemmaForConditionalGeneration

    shards = train_only(tmp_path / "train", 12)
    assert_resume_is_exact(tmp_path, monkeypatch, shards, "--model", PRESET, "--mode", "lora", "--grad-accum", "2",
                           "--set", "train.lora_rank=4")
    adapted, processor = load_model_and_processor(str(tmp_path / "run" / "last"))
    assert isinstance(adapted, PaliGemmaForConditionalGeneration)  # base rebuilt from captune.json, adapter merged
    base, _ = load_model_and_processor(PRESET, seed=42)
    layer = "model.language_model.layers.0.self_attn"
    assert not torch.equal(adapted.state_dict()[f"{layer}.q_proj.weight"], base.state_dict()[f"{layer}.q_proj.weight"])
    mlp = "model.language_model.layers.0.mlp.gate_proj.weight"  # not a default LoRA target: unchanged
    assert torch.equal(adapted.state_dict()[mlp], base.state_dict()[mlp])
    images = [Image.open(p).convert("RGB") for p in sorted((data / "validation").glob("*.png"))]
    assert len(caption_images(adapted.eval(), processor, images, GenerationOptions(max_new_tokens=3))) == len(images)



def test_preset_learns_under_its_defaults(tmp_path, no_java):
    """Direction, not a tuned threshold: under tiny-paligemma's own defaults (lr 1e-3, mode full) the training loss
    and the held-out (teacher-forced) validation loss fall within 18 steps. Exact match takes longer (the random
    SigLIP tells colours and shapes apart after ~300 steps): the demo's figure is in the README."""
    from captune.config import load_config
    from captune.train import train

    data = make_synthetic(tmp_path / "data", n_train=48, n_val=8, seed=7)
    cfg = load_config(None, {
        "output": str(tmp_path / "run"), "data": {"path": str(data), "num_workers": 0}, "model": {"name": PRESET},
        "train": {"epochs": 3, "batch_size": 8, "log_every_steps": 1, "label_smoothing": 0.0},
        "eval": {"batch_size": 8, "max_new_tokens": 4},
    })
    train(cfg)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    validation = [r["loss"] for r in records if r["split"] in ("before", "validation")]
    assert losses[-1] < 0.75 * losses[0], losses
    assert validation[-1] < 0.8 * validation[0], validation
