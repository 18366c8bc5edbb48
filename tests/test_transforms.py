"""Optional training transforms: BLIP's random resized crop (PIL) and caption normalisation."""

from __future__ import annotations

import random

from PIL import Image

from captune.data.collate import CaptionPairs, ItemOptions
from captune.data.records import CaptionSample
from captune.data.transforms import pre_caption, random_resized_crop


def test_pre_caption_matches_blip():
    assert pre_caption("  A Dog (running)!  On the  GRASS.\n") == "a dog running on the grass"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_caption("a cat, sitting") == "a cat, sitting"  # BLIP keeps commas


def test_random_resized_crop_size_and_area():
    image = Image.new("RGB", (200, 100))
    image.paste((255, 0, 0), (0, 0, 100, 100))  # left half red, right half black
    rng = random.Random(0)
    crops = [random_resized_crop(image, 32, rng=rng) for _ in range(20)]
    assert all(c.size == (32, 32) for c in crops)
    # Crops cover at least half the image, so red and black both show in most; never a flipped layout.
    for crop in crops:
        left, right = crop.getpixel((0, 16)), crop.getpixel((31, 16))
        assert not (left[0] < 50 and right[0] > 200)


def test_training_items_apply_options():
    sample = CaptionSample("a.png", ("A Red SQUARE.",), Image.new("RGB", (50, 40), (255, 0, 0)))
    item = CaptionPairs([sample], options=ItemOptions(augment_size=16, normalize_captions=True))[0]
    assert item["image"].size == (16, 16) and item["caption"] == "a red square"
    plain = CaptionPairs([sample])[0]
    assert plain["image"].size == (50, 40) and plain["caption"] == "A Red SQUARE."
