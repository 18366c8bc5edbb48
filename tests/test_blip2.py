"""BLIP-2's quirks, for both language models (tiny-blip2: OPT, decoder-only; tiny-blip2-t5: Flan-T5,
encoder-decoder): image placeholders in the language model's input, labels, the first decoding token, the
frozen-lm mode, LoRA on the language model, SDPA / int8 / grouped levers, and plain-transformers reloading."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from captune import models
from captune.cli import main
from captune.config import load_config, resolve_defaults
from captune.data.synthetic import make_synthetic
from captune.errors import CaptuneError
from captune.finetune import apply_mode
from captune.generate import GenerationOptions
from captune.model import load_model_and_processor
from captune.models.common import IGNORE_INDEX, mean_loss
from captune.speed import disable_sdpa, enable_sdpa, quantize_int8, share_images

PRESETS = ["tiny-blip2", "tiny-blip2-t5"]

# Nothing here reads a metric; Java's scorer would cost each training run's validations seconds (see conftest).
pytestmark = pytest.mark.usefixtures("no_java")


def _images():
    red = Image.new("RGB", (32, 32), (220, 30, 30))
    stripes = Image.new("RGB", (32, 32), (255, 255, 255))
    for x in range(0, 32, 8):
        stripes.paste((0, 0, 200), (x, 0, x + 4, 32))
    return red, stripes


@pytest.fixture(scope="module", params=PRESETS)
def preset(request):
    model, processor = load_model_and_processor(request.param, seed=0, sdpa=False)
    return request.param, model.eval(), processor, models.family_of(model)


def _own_loss(model, batch):
    """transformers' loss for the same batch: OPT takes labels aligned with its input; T5 takes decoder targets
    (labels[:, 1:]) and builds its decoder inputs by shifting them right."""
    if model.config.is_encoder_decoder:
        return model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"], labels=batch["labels"][:, 1:].contiguous()).loss
    return model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                 attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def test_presets_are_the_real_class_with_both_language_models(preset):
    name, model, processor, family = preset
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    assert isinstance(model, Blip2ForConditionalGeneration) and isinstance(processor, Blip2Processor)
    assert family.NAME == "blip2" and models.family_for(name) is family
    assert model.config.is_encoder_decoder == (name == "tiny-blip2-t5")
    assert processor.num_query_tokens == model.config.num_query_tokens  # else no placeholders are inserted
    assert family.image_token_id(processor) == model.config.image_token_id
    # Distinct query tokens (transformers' zero init makes them all equal; LAVIS draws them at random).
    queries = model.query_tokens[0]
    assert queries.std() > 1e-3 and not torch.allclose(queries[0], queries[1])


def test_labels_mask_placeholders_prompt_padding_and_start_where_generate_starts(preset):
    name, model, processor, family = preset
    queries = processor.num_query_tokens
    batch = family.tokenize(processor, ["a dog", "two red circles in a row"], prompt="a picture of", max_tokens=24)
    ids, labels = batch["input_ids"], batch["labels"]
    image = model.config.image_token_id
    assert (ids[:, :queries] == image).all() and not (ids[:, queries:] == image).any()
    start = family.start_token_id(processor)
    pixels = family.pixel_values(processor, list(_images()))
    output = model.generate(pixel_values=pixels, **family.generation_inputs(processor, 2, ""), max_new_tokens=2)
    if model.config.is_encoder_decoder:
        decoder, mask = batch["decoder_input_ids"], batch["decoder_attention_mask"]
        assert labels.shape == decoder.shape
        assert (decoder[:, 0] == start).all() and start == model.config.text_config.decoder_start_token_id
        assert (output[:, 0] == start).all()  # T5's generate() starts from decoder_start_token_id
        assert (labels[:, 0] == IGNORE_INDEX).all() and (labels[mask == 0] == IGNORE_INDEX).all()
        # No double shift: label t is the decoder input t (predicted from position t - 1), caption and </s>.
        kept = (mask == 1) & (torch.arange(mask.shape[1]) > 0)
        assert (labels[kept] == decoder[kept]).all()
        assert (labels[labels != IGNORE_INDEX][-1] == processor.tokenizer.eos_token_id)
        # The prompt is the encoder's: it is never a target.
        prompt_ids = processor.tokenizer("a picture of", add_special_tokens=False)["input_ids"]
        assert ids[0, queries:queries + len(prompt_ids)].tolist() == prompt_ids
    else:
        mask = batch["attention_mask"]
        assert labels.shape == ids.shape
        assert (labels[:, :queries] == IGNORE_INDEX).all()
        assert (ids[:, queries] == start).all() and start == model.config.text_config.bos_token_id
        # transformers' generate() puts bos </s> right after the placeholders, as training does.
        assert (output[:, queries] == start).all()
        prompt = family.prompt_length(processor.tokenizer, "a picture of")
        assert (labels[:, : queries + prompt] == IGNORE_INDEX).all()
        assert (labels[mask == 0] == IGNORE_INDEX).all()
        kept = mask.bool().clone()
        kept[:, : queries + prompt] = False
        assert (labels[kept] == ids[kept]).all()
        # Captions end with the language model's eos ("\n", as LAVIS trains and the released configs stop on).
        assert model.config.text_config.eos_token_id == family.end_token_id(processor)
        assert labels[0][labels[0] != IGNORE_INDEX][-1] == family.end_token_id(processor)


def test_loss_equals_the_models_own_loss_and_depends_on_the_image(preset):
    name, model, processor, family = preset
    red, stripes = _images()
    with torch.no_grad():
        batch = family.tokenize(processor, ["two red circles", "a dog"], prompt="a picture of", max_tokens=24)
        batch["pixel_values"] = family.pixel_values(processor, [red, stripes])
        assert torch.allclose(mean_loss(family, model, batch), _own_loss(model, batch), atol=1e-5)
        same = family.tokenize(processor, ["two red circles"] * 2, prompt="", max_tokens=24)
        losses = [mean_loss(family, model, {**same, "pixel_values": family.pixel_values(processor, [image] * 2)})
                  for image in (red, stripes)]
    assert abs(losses[0].item() - losses[1].item()) > 1e-4  # the model sees the image


def test_a_processor_without_num_query_tokens_is_refused_and_repaired_on_load(preset, tmp_path):
    name, model, processor, family = preset
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # What an older transformers saved: no num_query_tokens, so Blip2Processor inserts no placeholders.
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    saved.pop("num_query_tokens", None)
    (tmp_path / "processor_config.json").write_text(json.dumps(saved))
    from transformers import Blip2Processor

    bare = Blip2Processor.from_pretrained(tmp_path)
    assert bare.num_query_tokens is None
    with pytest.raises(CaptuneError, match="num_query_tokens"):
        family.tokenize(bare, ["a dog"], prompt="", max_tokens=24)
    reloaded, repaired = load_model_and_processor(str(tmp_path))
    assert repaired.num_query_tokens == model.config.num_query_tokens
    for (key, value) in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key


def test_generate_strips_the_prompt_and_special_tokens(preset):
    name, model, processor, family = preset
    pixels = family.pixel_values(processor, list(_images()))
    plain = family.generate(model, processor, pixels, GenerationOptions(max_new_tokens=3))
    prompted = family.generate(model, processor, pixels, GenerationOptions(max_new_tokens=3, num_beams=2,
                                                                           prompt="a picture of"))
    assert len(plain) == len(prompted) == 2
    for caption in plain + prompted:
        assert "<image>" not in caption and "</s>" not in caption and "<pad>" not in caption
        assert not caption.startswith("a picture of")


def test_modes_train_what_they_say(preset):
    name, _, _, _ = preset

    def fresh():
        return load_model_and_processor(name, sdpa=False)[0]

    def trains(model, prefix):
        return {p.requires_grad for n, p in model.named_parameters() if n.startswith(prefix)}

    frozen_lm = apply_mode(fresh(), "frozen-lm")
    assert trains(frozen_lm, "language_model") == {False}
    for part in ("vision_model", "qformer", "query_tokens", "language_projection"):
        assert trains(frozen_lm, part) == {True}, part
    frozen_vision = apply_mode(fresh(), "frozen-vision")
    assert trains(frozen_vision, "vision_model") == {False} and trains(frozen_vision, "language_model") == {True}
    # LoRA on the language model's query/value projections, named either way (q_proj,v_proj or q,v).
    for targets in ("q_proj,v_proj", "q,v"):
        lora = apply_mode(fresh(), "lora", lora_rank=4, lora_targets=targets)
        adapted = {n for n, p in lora.named_parameters() if p.requires_grad}
        assert adapted and all("lora_" in n and "language_model" in n for n in adapted), sorted(adapted)[:3]
        assert any(".v_proj." in n or ".v." in n for n in adapted)
    with_vision = apply_mode(fresh(), "lora", lora_rank=4, lora_targets="q,v", lora_vision=True)
    assert any("vision_model" in n for n, p in with_vision.named_parameters() if p.requires_grad)
    with pytest.raises(CaptuneError, match="matches no Linear"):
        apply_mode(fresh(), "lora", lora_targets="fc1")


def test_family_defaults_frozen_lm_for_pretrained_and_full_for_presets(tmp_path):
    family = models.family_module("blip2")
    opt = models.family_defaults("Salesforce/blip2-opt-2.7b")
    t5 = models.family_defaults("Salesforce/blip2-flan-t5-xl")
    assert opt["train.mode"] == t5["train.mode"] == "frozen-lm" and opt["train.lr"] == 1e-5
    assert (opt["train.lora_targets"], t5["train.lora_targets"]) == ("q_proj,v_proj", "q,v")
    assert family.defaults("tiny-blip2")["train.mode"] == "full"  # a random language model cannot stay frozen
    # A saved T5 directory is told from its config.json, before any weights load.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2", "text_config": {"model_type": "t5"}}))
    assert models.family_defaults(str(tmp_path))["train.lora_targets"] == "q,v"
    cfg = resolve_defaults(load_config(None, ["model.name=Salesforce/blip2-opt-2.7b"]), opt)
    assert cfg.train.mode == "frozen-lm"
    explicit = resolve_defaults(load_config(None, ["train.mode=lora"]), opt)
    assert explicit.train.mode == "lora"
    # BLIP gives no mode: everything trains, as before.
    assert resolve_defaults(load_config(None, []), models.family_defaults("tiny")).train.mode == "full"


def test_sdpa_gives_the_same_loss_and_gradients_and_switches_back(preset):
    name, model, processor, family = preset
    red, stripes = _images()
    batch = family.tokenize(processor, ["two red circles", "a dog in a row"], prompt="", max_tokens=24)
    batch["pixel_values"] = family.pixel_values(processor, [red, stripes])
    results = []
    for sdpa in (False, True):
        candidate, _ = load_model_and_processor(name, sdpa=sdpa)
        candidate.eval()
        loss = mean_loss(family, candidate, batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in candidate.named_parameters() if p.grad is not None}))
        if sdpa:
            # ViT and Q-Former (self + cross) attention, and the language model's.
            assert enable_sdpa(candidate) >= 2 + 2 * 2 + 2 and disable_sdpa(candidate) >= 8
    (eager_loss, eager_grads), (sdpa_loss, sdpa_grads) = results
    assert abs(eager_loss - sdpa_loss) < 1e-5
    for key, grad in eager_grads.items():
        torch.testing.assert_close(sdpa_grads[key], grad, atol=1e-5, rtol=1e-3)


def test_int8_and_grouped_levers(preset):
    name, model, processor, family = preset
    red, stripes = _images()
    import copy

    quantized = quantize_int8(copy.deepcopy(model))
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantized.language_model.modules())
    captions = family.generate(quantized, processor, family.pixel_values(processor, [red, stripes]),
                               GenerationOptions(max_new_tokens=3))
    assert len(captions) == 2
    # Grouped: one image row per image, repeated per caption by the vision tower's hook: same loss as repeating.
    captions = ["two red circles", "a dog", "one blue square"]
    text = family.tokenize(processor, captions, prompt="", max_tokens=24)
    with torch.no_grad():
        repeated = mean_loss(family, model, {**text, "pixel_values": family.pixel_values(processor, [red, red, stripes])})
        with share_images(family.vision_tower(model), torch.tensor([0, 0, 1])):
            grouped = mean_loss(family, model, {**text, "pixel_values": family.pixel_values(processor, [red, stripes])})
    assert torch.allclose(repeated, grouped, atol=1e-5)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("shapes"), n_train=16, n_val=4, seed=5)


@pytest.fixture(scope="module", params=PRESETS)
def trained_run(request, shapes, tmp_path_factory):
    """One 3-step `captune train` run per preset, shared by the CLI tests (each CLI round trip costs seconds)."""
    run = tmp_path_factory.mktemp(f"run-{request.param}")
    assert main(["-q", "train", "--data", str(shapes), "--model", request.param, "--output", str(run),
                 "--max-steps", "3", "--batch-size", "4", "--num-workers", "0", "--report-to", "none",
                 "--set", "eval.num_beams=1", "--set", "eval.max_new_tokens=4", "--prompt", "a picture of"]) == 0
    return request.param, run


def test_saved_best_reloads_with_plain_transformers_and_captions_as_captune(trained_run, shapes, capsys):
    name, run = trained_run
    saved = json.loads((run / "best" / "captune.json").read_text())
    capsys.readouterr()
    images = sorted((shapes / "validation").glob("*.png"))[:2]
    assert main(["caption", "--model", str(run / "best"), "--format", "jsonl", *map(str, images)]) == 0
    ours = [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from captune.modelcard import snippet_options

    processor = AutoProcessor.from_pretrained(run / "best")
    model = AutoModelForImageTextToText.from_pretrained(run / "best").eval()
    assert type(model).__name__ == "Blip2ForConditionalGeneration" and processor.num_query_tokens
    theirs = []
    for image in images:
        inputs = processor(images=Image.open(image).convert("RGB"), text=saved["prompt"].strip(), return_tensors="pt")
        # The generate() arguments the model card's snippet shows (captune.json's decoding options).
        output = model.generate(**inputs, **snippet_options(saved["generation"]))
        if not model.config.is_encoder_decoder:
            output = output[:, inputs["input_ids"].shape[1]:]
        theirs.append(processor.decode(output[0], skip_special_tokens=True).strip())
    assert ours == theirs


def test_preset_learns_under_its_defaults(tmp_path):
    """Direction, not a tuned threshold: under tiny-blip2's own defaults (lr 1e-3, mode full) the training loss and
    the held-out (teacher-forced) validation loss fall within a dozen steps. The demo's figures (both presets) are
    in the README."""
    from captune.train import train

    data = make_synthetic(tmp_path / "data", n_train=48, n_val=8, seed=7)
    cfg = load_config(None, {
        "output": str(tmp_path / "run"), "data": {"path": str(data), "num_workers": 0}, "model": {"name": "tiny-blip2"},
        "train": {"epochs": 2, "batch_size": 8, "log_every_steps": 1, "label_smoothing": 0.0},
        "eval": {"batch_size": 8, "max_new_tokens": 4},
    })
    train(cfg)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    validation = [r["loss"] for r in records if r["split"] in ("before", "validation")]
    # 12 steps from a random model: the loss is still falling steeply.
    assert losses[-1] < 0.75 * losses[0], losses
    assert validation[-1] < 0.8 * validation[0], validation


def test_full_size_parameter_counts_behind_the_readme_memory_figures():
    from transformers import Blip2ForConditionalGeneration

    family = models.family_module("blip2")
    counts = {}
    for lm in ("opt", "t5"):
        with torch.device("meta"):  # the architecture only: no memory, nothing downloaded
            model = Blip2ForConditionalGeneration(family.full_size_config(lm))
        family.set_trainable(model, "frozen-lm")
        counts[lm] = (sum(p.numel() for p in model.parameters()),
                      sum(p.numel() for p in model.parameters() if p.requires_grad))
    assert round(counts["opt"][0] / 1e6) == 3745 and round(counts["t5"][0] / 1e6) == 3877
    assert round(counts["opt"][1] / 1e6) == round(counts["t5"][1] / 1e6) == 1093


def test_caption_lengths_count_the_rows_tokenize_builds(preset):
    name, model, processor, family = preset
    captions = ["a dog", "two red circles in a row"]
    lengths = family.caption_lengths(processor.tokenizer, captions, "a picture of")
    batch = family.tokenize(processor, captions, prompt="a picture of", max_tokens=64)
    rows = batch.get("decoder_attention_mask", batch["attention_mask"]).sum(1)
    if not model.config.is_encoder_decoder:
        rows = rows - processor.num_query_tokens
    assert lengths == rows.tolist()


def test_the_presets_processor_works_as_users_call_it(preset):
    """`processor(images=..., text=...)`, as the transformers docs call it, inserts one placeholder per query token.
    Before: the preset's tokenizer carried image_token as a plain string and Blip2Processor.__call__ failed on
    `.content`."""
    _, model, processor, _ = preset
    batch = processor(images=_images(), text=["a red square", "blue stripes"], return_tensors="pt", padding=True)
    placeholders = (batch["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert placeholders.tolist() == [model.config.num_query_tokens] * 2
