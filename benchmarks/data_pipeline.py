"""Images per second from JPEG files on disk to batched 384-px `pixel_values`.

captune: CaptionPairs (JPEG draft decoding at the processor size) in DataLoader workers, batched by CaptionCollator.
baseline: the notebook's way, `processor(images=Image.open(p).convert("RGB"))` per sample in the main process.
Both on the same generated 1024x768 JPEGs. Prints both rates and the ratio.

    PYTHONPATH=src python benchmarks/data_pipeline.py [--images 200] [--workers 2] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import BlipProcessor

from captune.data.collate import CaptionCollator, CaptionPairs, ItemOptions
from captune.data.records import CaptionSample
from captune.models.blip import blip_tokenizer, image_processor

SIZE = 384


def make_jpegs(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        # Smooth gradients plus noise: compresses like a photo, not like a flat colour.
        x = np.linspace(0, 255, 1024)[None, :, None]
        y = np.linspace(0, 255, 768)[:, None, None]
        pixels = (x * 0.5 + y * 0.5 + rng.normal(0, 20, (768, 1024, 3)) + i) % 256
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def captune_rate(paths, processor, workers: int, batch_size: int) -> float:
    samples = [CaptionSample(p.name, ("a photo",), p) for p in paths]
    loader = DataLoader(CaptionPairs(samples, options=ItemOptions(draft_size=SIZE)), batch_size=batch_size,
                        num_workers=workers, collate_fn=CaptionCollator(processor))
    start = time.perf_counter()
    n = sum(batch["pixel_values"].shape[0] for batch in loader)
    return n / (time.perf_counter() - start)


def baseline_rate(paths, processor, batch_size: int) -> float:
    start = time.perf_counter()
    n, pending = 0, []
    for path in paths:
        pending.append(processor(images=Image.open(path).convert("RGB"), text="a photo", return_tensors="pt"))
        if len(pending) == batch_size:
            n += torch.cat([p["pixel_values"] for p in pending]).shape[0]
            pending = []
    n += torch.cat([p["pixel_values"] for p in pending]).shape[0] if pending else 0
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    processor = BlipProcessor(image_processor=image_processor(SIZE), tokenizer=blip_tokenizer())
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.images)
        baseline = baseline_rate(paths, processor, args.batch_size)
        ours = captune_rate(paths, processor, args.workers, args.batch_size)
    print(f"baseline (BlipProcessor per sample, main process): {baseline:8.1f} images/s")
    print(f"captune  ({args.workers} workers, JPEG draft at {SIZE}):        {ours:8.1f} images/s")
    print(f"ratio: {ours / baseline:.2f}x")


if __name__ == "__main__":
    main()
