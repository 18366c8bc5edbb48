"""The data and train options reach the training loop itself (not only the helpers they configure)."""

from __future__ import annotations

import json

import torch
from datafiles import COLOURS, png, write_jsonl

from captune.cli import main
from captune.data import collate
from captune.data.transforms import pre_caption
from captune.models import blip


def test_smoothing_augment_normalize_and_pixel_limit_reach_training(tmp_path, monkeypatch):
    """Kills these mutations of tools/mutants.py, each of which left every other test passing: "train loop: label
    smoothing forced to 0", "data.augment never applied in training", "data.normalize_captions never applied in
    training", "data.max_image_pixels ignored in training".

    One tiny run records what the training collator received and the smoothing the family's loss was called with
    while gradients were on (validation calls it too, without them; this run has no validation data).
    """
    root = tmp_path / "data"
    root.mkdir()
    rows = []
    for i in range(3):
        png(root / f"img{i}.png", COLOURS[i], size=(40, 30))
        rows.append({"file_name": f"img{i}.png", "text": f"A Red SQUARE, Number {i}!"})
    png(root / "big.png", size=(100, 100))  # 10,000 pixels: over the 5,000-pixel limit below
    rows.append({"file_name": "big.png", "text": "too big"})
    write_jsonl(root / "metadata.jsonl", rows)

    items, smoothing = [], []
    real_call = collate.CaptionCollator.__call__
    monkeypatch.setattr(collate.CaptionCollator, "__call__", lambda self, batch: items.extend(batch) or
                        real_call(self, batch))
    real_loss = blip.loss_sum

    def loss_sum(model, batch, *, label_smoothing):
        if torch.is_grad_enabled():
            smoothing.append(label_smoothing)
        return real_loss(model, batch, label_smoothing=label_smoothing)

    monkeypatch.setattr(blip, "loss_sum", loss_sum)
    run = tmp_path / "run"
    assert main(["-q", "train", "--data", str(root), "--model", "tiny", "--output", str(run), "--epochs", "1",
                 "--batch-size", "4", "--num-workers", "0", "--report-to", "none",
                 "--set", "train.label_smoothing=0.3", "--set", "data.augment=true",
                 "--set", "data.normalize_captions=true", "--set", "data.max_image_pixels=5000"]) == 0

    assert smoothing and all(value == 0.3 for value in smoothing)
    good = [item for item in items if "skip" not in item]
    assert len(good) == 3 and all(item["image"].size == (64, 64) for item in good)  # cropped to the ViT's size
    assert sorted(item["caption"] for item in good) == [pre_caption(f"A Red SQUARE, Number {i}!", 30)
                                                        for i in range(3)]
    assert all(item["caption"].islower() for item in good)
    skipped = json.loads((run / "summary.json").read_text())["skipped_samples"]
    assert [s["id"] for s in skipped] == ["big.png"] and "pixel" in skipped[0]["reason"]
