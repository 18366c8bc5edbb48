"""Does decoding training JPEGs in draft mode cost caption quality? (issue 14, item 4)

captune decodes training JPEGs with libjpeg's DCT scaling (`Image.draft`: the smallest 1/2, 1/4 or 1/8 scale still at
least the model's input size; 2.59x the images/s of full decoding, README), while evaluation decodes at full size. So
the model trains on slightly different pixels than it is scored on. This trains the tiny preset twice on the same
JPEGs, same seed, same steps: with draft decoding (captune's default) and at full size, and scores both on held-out
JPEGs decoded at full size (as `captune eval` and validation do) and in draft mode.

The images are the synthetic scenes drawn at 512 px and saved as JPEG (quality 90): at the tiny model's 64 px input,
draft mode decodes them at 1/8 scale, the largest difference draft mode can make.

    python benchmarks/jpeg_draft.py                       # 320 training / 64 held-out images, 4 epochs, seeds 0 1
    python benchmarks/jpeg_draft.py --train 64 --val 16 --epochs 1 --seeds 0   # a quick smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import captune.data.collate as collate  # noqa: E402
import captune.train as train_module  # noqa: E402
from captune.config import load_config  # noqa: E402
from captune.data import build_dataset  # noqa: E402
from captune.data.synthetic import draw_scene  # noqa: E402
from captune.evaluate import evaluate  # noqa: E402
from captune.model import TINY_IMAGE_SIZE, load_model_and_processor  # noqa: E402


def make_jpegs(root: Path, count: int, stream: int, size: int = 512) -> Path:
    """An image folder (root/train/) of `count` synthetic scenes as JPEGs; streams give disjoint scenes."""
    rng = random.Random(f"jpeg-draft-{stream}")
    folder = root / "train"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        image, caption = draw_scene(rng, size)
        name = f"{i:05d}.jpg"
        image.save(folder / name, quality=90)
        rows.append(json.dumps({"file_name": name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


@contextlib.contextmanager
def training_decode(draft: bool):
    """Training items decoded with or without draft mode (captune's training always asks for it)."""
    real = train_module.ItemOptions
    if not draft:
        train_module.ItemOptions = lambda **kw: real(**{**kw, "draft_size": 0})
    try:
        yield
    finally:
        train_module.ItemOptions = real


@contextlib.contextmanager
def evaluation_decode(draft: bool):
    """Held-out images decoded in draft mode (evaluation decodes at full size)."""
    real = collate.load_rgb
    if draft:
        collate.load_rgb = functools.partial(real, draft_size=TINY_IMAGE_SIZE)
    try:
        yield
    finally:
        collate.load_rgb = real


def run(data: Path, held_out: Path, output: Path, *, draft: bool, seed: int, epochs: int) -> dict:
    cfg = load_config(None, {
        "output": str(output),
        "model": {"name": "tiny"},
        "data": {"path": str(data), "num_workers": 0},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 1e-3, "warmup_ratio": 0.05, "seed": seed,
                  "log_every_steps": 10, "report_to": "none"},
        # No validation data in the run (scored below, both ways): nothing but training in the timing.
        "eval": {"num_beams": 1, "max_new_tokens": 8, "min_new_tokens": 0, "batch_size": 64},
    })
    start = time.perf_counter()
    with training_decode(draft):
        train_module.train(cfg)
    seconds = time.perf_counter() - start
    model, processor = load_model_and_processor(str(output / "last"))
    held_out = build_dataset(held_out).train
    options = train_module.eval_options(cfg)
    scores = {}
    for eval_draft in (False, True):
        with evaluation_decode(eval_draft):
            result = evaluate(model, processor, held_out, options, batch_size=64, meteor=False)
        scores["eval_draft" if eval_draft else "eval_full"] = result.metrics["cider"]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    return {"train_decode": "draft" if draft else "full", "seed": seed, "train_s": round(seconds, 1),
            "first_loss": losses[0], "last_loss": losses[-1], **scores}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=320)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        data, held_out = make_jpegs(Path(tmp) / "data", args.train, 0), make_jpegs(Path(tmp) / "held_out", args.val, 1)
        results = [run(data, held_out, Path(tmp) / f"run-{seed}-{mode}", draft=mode == "draft", seed=seed,
                       epochs=args.epochs) for seed in args.seeds for mode in ("draft", "full")]

    print(f"tiny preset, {args.train} training / {args.val} held-out JPEGs (512 px, q90), {args.epochs} epochs, "
          f"batch 16; CIDEr-D on the held-out images")
    print("| seed | training decode | CIDEr, eval full size | CIDEr, eval draft | last training loss | training s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['seed']} | {r['train_decode']} | {r['eval_full']:.3f} | {r['eval_draft']:.3f} | "
              f"{r['last_loss']:.3f} | {r['train_s']} |")
    for column in ("eval_full", "eval_draft"):
        means = {mode: statistics.mean(r[column] for r in results if r["train_decode"] == mode)
                 for mode in ("draft", "full")}
        print(f"mean CIDEr ({column.replace('_', ' ')}): trained draft {means['draft']:.3f}, trained full "
              f"{means['full']:.3f}, difference {means['draft'] - means['full']:+.3f}")
    for seed in args.seeds:
        # The two decodes must have fed the model different pixels (else the patch above missed the loader).
        first = {r["train_decode"]: r["first_loss"] for r in results if r["seed"] == seed}
        assert first["draft"] != first["full"], "draft and full training decoded the same pixels"
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
