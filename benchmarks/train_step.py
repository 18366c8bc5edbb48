"""Training throughput: the seed notebook's recipe versus captune's loop, same model, same batch size, same CPU.

    python benchmarks/train_step.py                      # full-size BLIP-base, batch 2 and 8
    python benchmarks/train_step.py --batch-sizes 2 --warmup 2 --steps 3
    python benchmarks/train_step.py --smoke              # tiny model, seconds (the test suite runs this)

Variants (each in its own subprocess, so peak RSS is its own):
    notebook      the seed notebook: a Dataset calling `processor(images=..., text=..., padding="max_length")` per
                  sample inside the loop (512 tokens), `model(input_ids, pixel_values, labels=input_ids)`, fp32,
                  `AdamW(model.parameters())`.
    captune-eager captune's pieces without the new levers: CaptionCollator (dynamic padding, bos, -100 pads),
                  caption_loss (label smoothing), decay groups, grad clipping, transformers' eager attention.
    captune       the same plus the levers train.py applies: SDPA attention and fused AdamW.
    captune-compile  the same plus torch.compile (opt-in: `--variants ... captune-compile`).
    captune-grouped  `captune` with `data.caption_sampling: grouped`: an image's captions batched together and its
                  ViT pass shared (meaningful with `--captions-per-image` > 1, e.g. 5 as in COCO).
Both decode JPEGs inside the timed loop (DataLoader num_workers=0: on a 2-core machine workers only steal cores).
Ratios are against `notebook` when it runs, else against the first variant listed.

    python benchmarks/train_step.py --captions-per-image 5 --batch-sizes 10 --variants captune captune-grouped
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, machine, peak_rss_mib, random_caption, run_worker, write_images  # noqa: E402

from captune.data.sampling import EpochSampler  # noqa: E402
from captune.data.collate import CaptionCollator, CaptionPairs  # noqa: E402
from captune.data.records import CaptionSample  # noqa: E402
from captune.speed import apply_speed_levers, share_images  # noqa: E402
from captune.train import caption_loss, parameter_groups  # noqa: E402

VARIANTS = ("notebook", "captune-eager", "captune", "captune-compile", "captune-grouped")


class NotebookDataset(Dataset):
    """The seed notebook's ImageCaptioningDataset: decode and process one sample at a time, pad to max_length."""

    def __init__(self, paths, captions, processor):
        self.paths, self.captions, self.processor = paths, captions, processor

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = Image.open(self.paths[index]).convert("RGB")
        encoding = self.processor(images=image, text=self.captions[index], padding="max_length", return_tensors="pt")
        return {k: v.squeeze() for k, v in encoding.items()}


def run_variant(variant: str, batch_size: int, warmup: int, steps: int, smoke: bool, images: Path,
                per_image: int = 1) -> dict:
    """Time `warmup + steps` optimizer steps of one variant; return samples/s and peak RSS."""
    model, processor, _ = build_model(smoke)
    model.train()
    paths = sorted(images.glob("*.jpg"))
    rng = random.Random(0)
    captions = [tuple(random_caption(rng) for _ in range(per_image)) for _ in paths]
    if variant == "notebook":
        pairs = [(p, c) for p, cs in zip(paths, captions) for c in cs]
        dataset = NotebookDataset([p for p, _ in pairs], [c for _, c in pairs], processor)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    else:
        samples = [CaptionSample(id=p.name, captions=c, image=p) for p, c in zip(paths, captions)]
        collator = CaptionCollator(processor, max_tokens=40)
        items = CaptionPairs(samples, "grouped" if variant == "captune-grouped" else "all")
        sampler = EpochSampler(len(items), 0, groups=items.groups())
        loader = DataLoader(items, batch_size=batch_size, sampler=sampler, collate_fn=collator)
        levers = variant != "captune-eager"
        apply_speed_levers(model, sdpa=levers, compile=variant == "captune-compile")
        optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-5, fused=levers)

    def batches():
        while True:
            yield from loader

    times, tokens, cpu = [], [], 0.0
    stream = batches()
    for step in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        batch = next(stream)
        if variant == "notebook":
            input_ids = batch.pop("input_ids")
            outputs = model(input_ids=input_ids, pixel_values=batch.pop("pixel_values"), labels=input_ids)
            loss = outputs.loss
        else:
            with share_images(model.vision_model, batch.get("image_index")):
                outputs = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"])
            loss = caption_loss(outputs.logits, batch["labels"], 0.1)
        loss.backward()
        if variant != "notebook":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            cpu += time.process_time() - cpu_start
            tokens.append(batch["input_ids"].shape[1] if "input_ids" in batch else input_ids.shape[1])
    return {
        "variant": variant, "batch_size": batch_size, "steps": steps, "captions_per_image": per_image,
        "samples_per_s": batch_size * steps / sum(times), "median_step_s": statistics.median(times),
        "text_tokens": statistics.mean(tokens), "peak_rss_mib": peak_rss_mib(),
        # CPU seconds per sample (all threads): less sensitive than wall time to other jobs on a shared machine.
        "cpu_s_per_sample": cpu / (batch_size * steps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["notebook", "captune-eager", "captune"])
    parser.add_argument("--captions-per-image", type=int, default=1, help="captions each image has (COCO: 5)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 warm-up + 1 timed step")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.warmup, args.steps = 1, 1
    if args.worker:
        variant, images = args.worker
        result = run_variant(variant, args.batch_sizes[0], args.warmup, args.steps, args.smoke, Path(images),
                             args.captions_per_image)
        print(json.dumps(result))
        return 0

    info = machine()
    print(f"# train_step: {'tiny (smoke)' if args.smoke else 'BLIP-base, 384 px, random weights'}, fp32, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {args.captions_per_image} caption(s) per image; {info}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        count = max(args.batch_sizes) * (args.warmup + args.steps)
        write_images(Path(tmp), count, size=(160, 120) if args.smoke else (640, 480))
        for batch_size in args.batch_sizes:
            for variant in args.variants:
                common = ["--batch-sizes", str(batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps),
                          "--captions-per-image", str(args.captions_per_image)]
                result = run_worker(Path(__file__), [variant, tmp, *common, *(["--smoke"] if args.smoke else [])])
                results.append(result)
                print(f"  {variant:16s} batch {batch_size:2d}: {result['samples_per_s']:7.3f} samples/s "
                      f"(median step {result['median_step_s']:.2f} s, {result['text_tokens']:.0f} text tokens, "
                      f"peak RSS {result['peak_rss_mib'] / 1024:.2f} GiB)", flush=True)
    baseline = "notebook" if "notebook" in args.variants else args.variants[0]
    print(f"\n| batch | variant | samples/s | x {baseline} | CPU s/sample | x {baseline} (CPU time) | peak RSS GiB |"
          "\n|---|---|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        rows = [r for r in results if r["batch_size"] == batch_size]
        base = next((r for r in rows if r["variant"] == baseline), None)
        for r in rows:
            ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-"
            cpu_ratio = f"{base['cpu_s_per_sample'] / r['cpu_s_per_sample']:.2f}x" if base else "-"
            print(f"| {batch_size} | {r['variant']} | {r['samples_per_s']:.3f} | {ratio} | "
                  f"{r['cpu_s_per_sample']:.1f} | {cpu_ratio} | {r['peak_rss_mib'] / 1024:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
