"""The model-family layer: visible dispatch from config.model_type, refusal before any weights load, family
defaults under explicit flags and YAML, and the BLIP family's batch contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from captune import models
from captune.cli import main
from captune.config import load_config, resolve_defaults
from captune.data.synthetic import make_synthetic
from captune.errors import CaptuneError
from captune.generate import GenerationOptions
from captune.model import load_model_and_processor
from captune.models.common import IGNORE_INDEX, mean_loss

CONTRACT = ("defaults", "preset_tokenizer", "load", "image_size", "pixel_values", "tokenize", "start_token_id",
            "target_tokens", "loss_sum", "sequence_nll", "generate", "set_trainable", "lora_pattern", "vision_tower", "int8_targets", "sdpa_forward",
            "usage_snippet", "caption_lengths")
LEVERS = {"sdpa", "beam_cache", "int8", "grouped"}


def test_every_listed_family_implements_the_contract():
    families = set(models.MODEL_TYPES.values()) | set(models.PRESETS.values())
    for name in families:
        family = models.family_module(name)
        assert family.NAME == name
        missing = [f for f in CONTRACT if not callable(getattr(family, f, None))]
        assert not missing, f"{name} lacks {missing}"
        assert family.SPEED_LEVERS <= LEVERS
        assert set(family.PRESETS) == {p for p, f in models.PRESETS.items() if f == name}
        for preset in family.PRESETS:
            assert set(family.defaults(preset)) >= {"train.lr", "train.batch_size", "train.lora_targets",
                                                     "data.max_caption_tokens", "eval.num_beams",
                                                     "eval.max_new_tokens", "eval.min_new_tokens"}


def test_dispatch_reads_model_type_without_weights(tmp_path):
    # A directory holding only config.json: dispatch must not need (or read) any weights.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip"}))
    assert models.family_for(str(tmp_path)).NAME == "blip"
    assert models.family_for("tiny").NAME == "blip"
    model, processor = load_model_and_processor("tiny")
    assert models.family_of(model).NAME == "blip"
    assert models.family_of_processor(processor).NAME == "blip"


def _save_foreign(kind: str, path: Path) -> Path:
    """A saved non-captioning model with a tiny random config (offline)."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32))
    else:
        model = ViTModel(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def train_only(tmp_path_factory) -> Path:
    root = make_synthetic(tmp_path_factory.mktemp("train_only"), n_train=8, n_val=1)
    shutil.rmtree(root / "validation")
    return root


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_unsupported_model_type_is_refused_in_one_line_before_loading(kind, tmp_path, train_only, capsys,
                                                                     monkeypatch):
    foreign = _save_foreign(kind, tmp_path / kind)
    capsys.readouterr()  # save_pretrained's progress bar
    touched = []
    import transformers

    # Any weights load at all would go through from_pretrained: refusal must come first.
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: touched.append(cls) or (_ for _ in ()).throw(AssertionError)))
    run = tmp_path / "run"
    code = main(["-q", "train", "--data", str(train_only), "--model", str(foreign), "--output", str(run),
                 "--max-steps", "1", "--num-workers", "0", "--report-to", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert f"model_type '{kind}'" in err and "supported model types: blip" in err
    assert not run.exists() and not touched
    assert main(["-q", "caption", "--model", str(foreign), str(tmp_path)]) == 2
    assert f"model_type '{kind}'" in capsys.readouterr().err


def test_missing_or_unexpected_weights_are_named_never_randomly_initialised(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path / "ok")
    processor.save_pretrained(tmp_path / "ok")
    weights = load_file(tmp_path / "ok" / "model.safetensors")
    dropped = "text_decoder.bert.encoder.layer.1.crossattention.self.query.weight"
    for name, change in (("missing", lambda w: w.pop(dropped)),
                         ("unexpected", lambda w: w.__setitem__("extra_head.weight", torch.zeros(2, 2)))):
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        edited = dict(weights)
        change(edited)
        save_file(edited, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CaptuneError, match=name) as info:
            load_model_and_processor(str(tmp_path / name))
        assert (dropped if name == "missing" else "extra_head.weight") in str(info.value)


def test_family_defaults_fill_only_unset_fields(tmp_path):
    tiny_defaults = models.family_defaults("tiny")
    assert tiny_defaults["train.lr"] == 1e-3  # the random tiny BLIP learns at 1e-3, not a pretrained model's 1e-5
    assert models.family_module("blip").defaults("Salesforce/blip-image-captioning-base")["train.lr"] == 1e-5
    applied = resolve_defaults(load_config(None, ["model.name=tiny"]), tiny_defaults)
    assert (applied.train.lr, applied.train.batch_size, applied.data.max_caption_tokens) == (1e-3, 16, 40)
    assert (applied.eval.num_beams, applied.train.lora_targets) == (3, "query,value")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name: tiny\ntrain:\n  lr: 2.0e-4\neval:\n  num_beams: 1\n")
    from_yaml = resolve_defaults(load_config(recipe), tiny_defaults)
    assert (from_yaml.train.lr, from_yaml.eval.num_beams) == (2e-4, 1)
    assert from_yaml.eval.max_new_tokens == tiny_defaults["eval.max_new_tokens"]
    flag = resolve_defaults(load_config(recipe, {"train": {"lr": 5e-4}}), tiny_defaults)
    assert flag.train.lr == 5e-4 and flag.eval.num_beams == 1
    with pytest.raises(CaptuneError, match="eval.min_new_tokens"):  # resolved values are validated too
        resolve_defaults(load_config(None, ["eval.min_new_tokens=30"]), tiny_defaults)


def test_run_config_records_resolved_values_flags_and_yaml_winning(train_only, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 2.0e-4\n  batch_size: 8\n")
    common = ["-q", "train", "--data", str(train_only), "--model", "tiny", "--max-steps", "1", "--num-workers", "0",
              "--report-to", "none"]
    assert main([*common, "--output", str(tmp_path / "a"), "--config", str(recipe), "--batch-size", "4"]) == 0
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["train"]["lr"] == 2e-4  # YAML over the family default
    assert saved["train"]["batch_size"] == 4  # the flag over YAML
    assert saved["data"]["max_caption_tokens"] == 40 and saved["eval"]["num_beams"] == 3  # family defaults
    assert main([*common, "--output", str(tmp_path / "b")]) == 0
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert saved["train"]["lr"] == 1e-3 and saved["train"]["lora_targets"] == "query,value"
    from captune.config import FAMILY_DEFAULTED

    assert all(saved[s][k] is not None for s, k in (f.split(".") for f in FAMILY_DEFAULTED))


def _images():
    red = Image.new("RGB", (64, 64), (220, 30, 30))
    stripes = Image.new("RGB", (64, 64), (255, 255, 255))
    for x in range(0, 64, 8):
        stripes.paste((0, 0, 200), (x, 0, x + 4, 64))
    return red, stripes


@pytest.fixture(scope="module")
def blip():
    return models.family_module("blip")


def test_blip_labels_mask_padding_prompt_and_start_where_generate_starts(blip, tiny):
    model, processor = tiny
    batch = blip.tokenize(processor, ["a dog", "two red circles in a row"], prompt="a picture of", max_tokens=40)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    prompt = blip.prompt_length(processor.tokenizer, "a picture of")
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert (labels[:, :prompt] == IGNORE_INDEX).all()
    assert (labels[:, prompt:][mask[:, prompt:] == 1] == ids[:, prompt:][mask[:, prompt:] == 1]).all()
    start = blip.start_token_id(processor)
    assert (ids[:, 0] == start).all()
    # generate() begins every caption from that same token.
    pixels = blip.pixel_values(processor, list(_images()))
    output = model.generate(pixel_values=pixels, max_new_tokens=2)
    assert (output[:, 0] == start).all() and start == model.config.text_config.bos_token_id


def test_blip_loss_equals_the_models_own_loss_and_depends_on_the_image(blip, tiny):
    model, processor = tiny
    model.eval()
    red, stripes = _images()
    batch = blip.tokenize(processor, ["two red circles", "a dog"], prompt="", max_tokens=40)
    batch["pixel_values"] = blip.pixel_values(processor, [red, stripes])
    with torch.no_grad():
        ours = mean_loss(blip, model, batch)
        theirs = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        assert torch.allclose(ours, theirs, atol=1e-5)
        same_caption = blip.tokenize(processor, ["two red circles"] * 2, prompt="", max_tokens=40)
        losses = [mean_loss(blip, model, {**same_caption, "pixel_values": blip.pixel_values(processor, [image] * 2)})
                  for image in (red, stripes)]
    assert abs(losses[0].item() - losses[1].item()) > 1e-4  # the model sees the image


def test_blip_generate_strips_the_prompt(blip, tiny):
    model, processor = tiny
    pixels = blip.pixel_values(processor, list(_images()))
    plain = blip.generate(model, processor, pixels, GenerationOptions(max_new_tokens=3))
    prompted = blip.generate(model, processor, pixels, GenerationOptions(max_new_tokens=3, prompt="a picture of"))
    assert len(plain) == len(prompted) == 2
    assert not any(c.startswith("a picture of") for c in prompted)
