"""Grouped caption sampling: an image's captions batched together, its ViT pass computed once and shared."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from captune.data.sampling import EpochSampler
from captune.cli import main
from captune.data import CaptionSample, training_dataset
from captune.data.collate import CaptionCollator
from captune.model import load_model_and_processor
from captune.speed import share_images
from captune.train import caption_loss

from datafiles import COLOURS, tar_shards


def samples(captions_per_image: list[int]) -> list[CaptionSample]:
    return [CaptionSample(id=f"img{i}", captions=tuple(f"a colour number {i} take {k}" for k in range(n)),
                          image=Image.new("RGB", (40, 30), COLOURS[i % len(COLOURS)]))
            for i, n in enumerate(captions_per_image)]


def test_sampler_keeps_each_images_captions_together():
    sampler = EpochSampler(9, seed=0, groups=[3, 1, 5])
    runs = {0: [0, 1, 2], 1: [3], 2: [4, 5, 6, 7, 8]}
    orders = []
    for epoch in range(4):
        sampler.set_order(epoch)
        keys = list(sampler)
        assert {e for e, _ in keys} == {epoch}  # the epoch travels with each index (to persistent workers)
        order = [index for _, index in keys]
        assert sorted(order) == list(range(9))
        chunks, at = [], 0
        while at < len(order):
            run = next(r for r in runs.values() if r[0] == order[at])
            assert order[at:at + len(run)] == run
            chunks.append(run[0])
            at += len(run)
        orders.append(tuple(chunks))
    assert len(set(orders)) > 1  # the images' order changes between epochs
    with pytest.raises(ValueError):
        EpochSampler(8, seed=0, groups=[3, 1, 5])


def test_grouped_batch_encodes_each_image_once_with_the_same_loss_and_gradients():
    model, processor = load_model_and_processor("tiny")
    model.eval()  # no dropout: the two passes must be comparable
    items = training_dataset(samples([3, 1, 2]), caption_sampling="grouped")
    collator = CaptionCollator(processor)
    grouped = collator([items[i] for i in range(len(items))])
    assert grouped["pixel_values"].shape[0] == 3 and grouped["input_ids"].shape[0] == 6
    assert grouped["image_index"].tolist() == [0, 0, 0, 1, 2, 2]
    flat = collator([{k: v for k, v in items[i].items() if k != "key"} for i in range(len(items))])
    assert "image_index" not in flat and flat["pixel_values"].shape[0] == 6

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        with share_images(model.vision_model, batch.get("image_index")):
            logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
        loss = caption_loss(logits, batch["labels"], 0.1)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    counted = []
    hook = model.vision_model.embeddings.patch_embedding.register_forward_hook(
        lambda m, a, out: counted.append(a[0].shape[0]))
    loss_g, grads_g = loss_and_grads(grouped)
    loss_f, grads_f = loss_and_grads(flat)
    hook.remove()
    assert counted == [3, 6]  # the ViT saw 3 images instead of 6
    assert torch.allclose(loss_g, loss_f, atol=1e-5)
    assert grads_g.keys() == grads_f.keys()
    for name, grad in grads_g.items():
        assert torch.allclose(grad, grads_f[name], atol=1e-5, rtol=1e-4), name
    assert not model.vision_model._forward_hooks  # the hook is gone once the step is done


def test_grouped_pairs_decode_each_image_once(monkeypatch):
    from captune.data import collate

    decoded = []
    real = collate.decode_image
    monkeypatch.setattr(collate, "decode_image", lambda sample, options, rng=None: decoded.append(sample.id) or real(sample, options, rng))
    items = training_dataset(samples([3, 2]), caption_sampling="grouped")
    sampler = EpochSampler(len(items), seed=1, groups=items.groups())
    batches = list(DataLoader(items, batch_size=5, sampler=sampler, collate_fn=lambda b: b))
    assert sorted(decoded) == ["img0", "img1"] and len(batches[0]) == 5


def test_grouped_shards_stream_an_images_captions_together(tmp_path):
    tar_shards(tmp_path / "shards", 2, 6)  # even samples carry two captions
    from captune.data import build_dataset

    stream = training_dataset(build_dataset(tmp_path / "shards").train, caption_sampling="grouped")
    keys = [item["key"] for item in stream if "key" in item]
    assert len(keys) == 18
    # Each image's captions arrive one after the other.
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert len(runs) == len(set(runs)) == 12


def test_train_with_grouped_sampling_end_to_end(tmp_path, monkeypatch):
    """Kills "grouped batches stop sharing the ViT pass" (tools/mutants.py) end to end: the training forwards
    encode fewer images than they train pairs (the run alone would pass with every caption row encoded)."""
    from transformers.models.blip.modeling_blip import BlipVisionModel

    encoded = []
    real_forward = BlipVisionModel.forward

    def counting_forward(self, pixel_values=None, *args, **kwargs):
        if torch.is_grad_enabled():  # training, not the final validation's generate()
            encoded.append(pixel_values.shape[0])
        return real_forward(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(BlipVisionModel, "forward", counting_forward)
    tar_shards(tmp_path / "shards", 1, 6)  # 9 pairs over 6 images
    run = tmp_path / "run"
    assert main(["-q", "train", "--data", str(tmp_path / "shards"), "--model", "tiny", "--output", str(run),
                 "--epochs", "1", "--batch-size", "3", "--caption-sampling", "grouped", "--num-workers", "0",
                 "--report-to", "none"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and not summary["skipped_samples"]
    # 3 batches of 3 pairs; an image's two captions can straddle a batch boundary at most twice, so <= 8 encodes.
    assert len(encoded) == 3 and 6 <= sum(encoded) <= 8, encoded
    assert (run / "last" / "model.safetensors").is_file()
