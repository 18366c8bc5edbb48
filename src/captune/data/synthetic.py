"""The embedded dataset: coloured shapes with compositional captions ("two red triangles").

Written to disk as a Hugging Face imagefolder (`train/` and `validation/`, each with `metadata.jsonl`) so the demo and
the tests exercise the same reader a user's folder goes through. Train and validation images are drawn from separate
random streams: the held-out images are new scenes, though the caption vocabulary is shared.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")


def caption_for(count: int, colour: str, shape: str) -> str:
    return f"{COUNTS[count - 1]} {colour} {shape}{'s' if count > 1 else ''}"


def draw_scene(rng: random.Random, size: int = 64) -> tuple[Image.Image, str]:
    """Draw 1-3 shapes of one colour and kind on a light background; return the image and its caption."""
    count = rng.randint(1, len(COUNTS))
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    # One shape per cell of a 2x2 grid keeps shapes apart, so the count is always visible.
    cell = size // 2
    for index in rng.sample(range(4), count):
        # Large shapes with a little jitter: a tiny ViT trained from scratch in minutes must tell them apart.
        r = rng.randint(cell // 2 - 4, cell // 2 - 2)
        slack = cell // 2 - r
        cx = (index % 2) * cell + cell // 2 + rng.randint(-slack, slack)
        cy = (index // 2) * cell + cell // 2 + rng.randint(-slack, slack)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image, caption_for(count, colour, shape)


def make_synthetic(root: str | Path, n_train: int = 1500, n_val: int = 100, seed: int = 0, size: int = 64, *,
                   caption_copies: int = 1, generic_captions: Sequence[str] = ()) -> Path:
    """Write the synthetic imagefolder under `root` (train/ and validation/) and return `root`.

    Idempotent: an existing, complete folder with the same parameters is reused.

    Args:
        caption_copies, generic_captions: each image's references are its own caption `caption_copies` times, then
            every caption of `generic_captions` (captions that fit any image, as real caption sets mix informative
            and uninformative ones: benchmarks/scst_synthetic.py builds its task where cross-entropy plateaus so).
            By default one reference, the image's caption.
    """
    root = Path(root)
    stamp = {"n_train": n_train, "n_val": n_val, "seed": seed, "size": size, "version": 1}
    several = caption_copies != 1 or bool(generic_captions)
    if several:  # only then, so that folders written before these options existed are still reused
        stamp.update(caption_copies=caption_copies, generic_captions=list(generic_captions))
    stamp_file = root / "synthetic.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return root
    for split, count, stream in (("train", n_train, 0), ("validation", n_val, 1)):
        rng = random.Random(f"{seed}-{stream}")
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(count):
            image, caption = draw_scene(rng, size)
            name = f"{split}_{i:05d}.png"
            image.save(folder / name)
            text = [caption] * caption_copies + list(generic_captions) if several else caption
            lines.append(json.dumps({"file_name": name, "text": text}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    # Written last: a folder interrupted mid-way is regenerated next time rather than trusted.
    stamp_file.write_text(json.dumps(stamp))
    return root
