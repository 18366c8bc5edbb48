"""Fine-tuning modes: trainable parameters per mode, LoRA save/export/reload, memory options."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BlipForConditionalGeneration

from captune.data.sampling import EpochSampler
from captune.cli import main
from captune.data import build_dataset
from captune.data.records import load_rgb
from captune.data.synthetic import make_synthetic
from captune.errors import CaptuneError
from captune.finetune import apply_mode, describe_parameters, probe_batch_size
from captune.generate import GenerationOptions, caption_images
from captune.model import load_model_and_processor

# Every run here is in-process and no test reads a Java-only metric: scored without Java (see conftest's no_java).
pytestmark = pytest.mark.usefixtures("no_java")


def tiny():
    return load_model_and_processor("tiny", seed=0)[0]


def test_trainable_parameters_per_mode():
    full_model = apply_mode(tiny(), "full")
    trainable, total = describe_parameters(full_model)
    assert trainable == total

    frozen = apply_mode(tiny(), "frozen-vision")
    vision = sum(p.numel() for p in frozen.vision_model.parameters())
    assert describe_parameters(frozen) == (total - vision, total)
    assert not any(p.requires_grad for p in frozen.vision_model.parameters())

    lora = apply_mode(tiny(), "lora", lora_rank=4, lora_targets="query,value")
    trainable, lora_total = describe_parameters(lora)
    # query and value of self- and cross-attention, 2 decoder layers: A (4x128) + B (128x4) each; cross-attention
    # query is 128 -> 128 and value 128 -> 128 too (encoder_hidden_size 128).
    assert trainable == 2 * 2 * 2 * (4 * 128 + 128 * 4)
    assert lora_total == total + trainable
    assert all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)

    with_vision = apply_mode(tiny(), "lora", lora_rank=4, lora_targets="query,value", lora_vision=True)
    # qkv (128 -> 384) and projection (128 -> 128) in 4 ViT layers.
    assert describe_parameters(with_vision)[0] == trainable + 4 * (4 * 128 + 384 * 4 + 4 * 128 + 128 * 4)


def test_lora_targets_that_match_nothing_are_an_error():
    with pytest.raises(CaptuneError, match="matches no Linear"):
        apply_mode(tiny(), "lora", lora_targets="fc1")


def test_lora_run_saves_adapter_exports_and_reloads_with_same_captions(tmp_path):
    data = make_synthetic(tmp_path / "data", n_train=16, n_val=4)
    run = tmp_path / "run"
    code = main(["-q", "train", "--data", str(data), "--model", "tiny", "--output", str(run), "--mode", "lora",
                 "--max-steps", "3", "--batch-size", "8", "--lr", "5e-2", "--num-workers", "0", "--report-to", "none",
                 "--set", "train.lora_rank=4", "--set", "eval.num_beams=1", "--set", "eval.min_new_tokens=0",
                 "--set", "eval.max_new_tokens=5"])
    assert code == 0
    for name in ("best", "last"):
        files = {p.name for p in (run / name).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "captune.json"} <= files
        assert "model.safetensors" not in files  # the adapter only
    assert json.loads((run / "last" / "captune.json").read_text())["base_model"] == "tiny"

    samples = build_dataset(data).validation
    images = [load_rgb(s.image, s.origin) for s in samples]
    options = GenerationOptions(num_beams=1, max_new_tokens=5, min_new_tokens=0)
    adapted, processor = load_model_and_processor(str(run / "last"))
    assert isinstance(adapted, BlipForConditionalGeneration)  # merged, no peft wrapper left
    captions = caption_images(adapted.eval(), processor, images, options)

    base, _ = load_model_and_processor("tiny", seed=42)
    # The adapter changed the weights it targets (the merged model is not the base).
    query = "text_decoder.bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(adapted.state_dict()[query], base.state_dict()[query])
    key = "text_decoder.bert.encoder.layer.0.attention.self.key.weight"
    assert torch.equal(adapted.state_dict()[key], base.state_dict()[key])

    exported = tmp_path / "exported"
    assert main(["-q", "export", str(run / "last"), "--output", str(exported)]) == 0
    assert not (exported / "adapter_config.json").exists()
    plain = BlipForConditionalGeneration.from_pretrained(exported).eval()
    assert caption_images(plain, processor, images, options) == captions
    assert main(["-q", "export", str(run), "--output", str(tmp_path / "from_run")]) == 0  # a run exports its best/
    assert (tmp_path / "from_run" / "model.safetensors").is_file()


def test_frozen_vision_run_leaves_the_vision_encoder_unchanged(tmp_path):
    data = make_synthetic(tmp_path / "data", n_train=8, n_val=2)
    run = tmp_path / "run"
    assert main(["-q", "train", "--data", str(data), "--model", "tiny", "--output", str(run), "--mode",
                 "frozen-vision", "--max-steps", "2", "--batch-size", "4", "--num-workers", "0", "--lr", "1e-2",
                 "--report-to", "none", "--set", "train.gradient_checkpointing=true"]) == 0
    trained, _ = load_model_and_processor(str(run / "last"))
    base, _ = load_model_and_processor("tiny", seed=42)
    for (name, a), b in zip(trained.vision_model.state_dict().items(), base.vision_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(trained.text_decoder.bert.encoder.layer[0].attention.self.query.weight,
                           base.text_decoder.bert.encoder.layer[0].attention.self.query.weight)


def test_batch_size_auto_needs_a_gpu(tmp_path):
    data = make_synthetic(tmp_path / "data", n_train=4, n_val=2)
    code = main(["-q", "train", "--data", str(data), "--model", "tiny", "--output", str(tmp_path / "run"),
                 "--batch-size", "auto", "--max-steps", "1", "--num-workers", "0", "--report-to", "none"])
    assert code == 2


def test_batch_size_probe_halves_until_it_fits():
    tried = []

    def fits(batch_size):
        tried.append(batch_size)
        if batch_size > 40:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return True

    found = probe_batch_size(fits, 256)
    # Accelerate shrinks the size geometrically after each out-of-memory error; the first that fits is kept.
    assert found == tried[-1] <= 40 < min(tried[:-1])
    assert tried[0] == 256 and tried == sorted(tried, reverse=True)
    with pytest.raises(CaptuneError, match="not even batch 1"):
        probe_batch_size(lambda b: (_ for _ in ()).throw(RuntimeError("CUDA out of memory.")), 4)


def test_epoch_order_depends_on_seed_and_epoch_only():
    a, b = EpochSampler(20, seed=3), EpochSampler(20, seed=3)
    a.set_order(0)
    first = list(a)
    a.set_order(1)
    assert list(a) != first
    b.set_order(1)
    assert list(b) == list(a)  # a fresh sampler asked for epoch 1 replays it, as a resumed run does
    assert sorted(index for _, index in first) == list(range(20)) and {e for e, _ in first} == {0}
