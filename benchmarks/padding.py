"""Length-grouped batching, measured before building it: how much of a training step is caption padding?

    python benchmarks/padding.py                       # BLIP-base FLOPs, batch 16, 4,000 COCO-length captions
    python benchmarks/padding.py --max-words 30        # a longer-tailed caption length distribution
    python benchmarks/padding.py --smoke               # tiny model (the test suite runs this)

captune pads each batch to its longest caption (`CaptionCollator`). Length-grouped batching (Hugging Face's
`LengthGroupedSampler`: shuffle, cut into mega-batches of 50 batches, sort each by length) would trim that padding
further. Its best case is removing all of it, so this counts, with `torch.utils.flop_counter` on the meta-device
model (forward + backward, nothing timed), the FLOPs per image-caption pair of a shuffled epoch against a
length-grouped one, batch by batch at each batch's padded length. The ratio is the lever's ceiling on compute.
"""

from __future__ import annotations

import argparse
import random
import sys
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BlipForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORDS, blip_base_config  # noqa: E402

from captune.data.collate import CaptionCollator  # noqa: E402
from captune.models import blip  # noqa: E402
from captune.models.blip import blip_tokenizer, tiny_config  # noqa: E402
from captune.speed import enable_sdpa  # noqa: E402
from captune.train import caption_loss  # noqa: E402


def length_grouped(lengths: list[int], batch_size: int, rng: random.Random, mega: int = 50) -> list[list[int]]:
    """Hugging Face's LengthGroupedSampler order, cut into batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunks = [order[i:i + mega * batch_size] for i in range(0, len(order), mega * batch_size)]
    grouped = [i for chunk in chunks for i in sorted(chunk, key=lambda i: -lengths[i])]
    return [grouped[i:i + batch_size] for i in range(0, len(grouped), batch_size)]


def shuffled(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    order = list(range(len(lengths)))
    rng.shuffle(order)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--min-words", type=int, default=8)
    parser.add_argument("--max-words", type=int, default=14, help="COCO averages about 10.5 words a caption")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 400 captions")
    args = parser.parse_args(argv)
    if args.smoke:
        args.captions = 400
    rng = random.Random(0)
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(args.min_words, args.max_words)))
                for _ in range(args.captions)]
    collator = CaptionCollator(type("P", (), {"tokenizer": blip_tokenizer()})(), max_tokens=40, family=blip)
    lengths = [int(collator.tokenize([c])["attention_mask"].sum()) for c in captions]

    with torch.device("meta"):
        model = BlipForConditionalGeneration(tiny_config() if args.smoke else blip_base_config())
    enable_sdpa(model)
    model.train()
    size = model.config.vision_config.image_size

    @lru_cache(maxsize=None)
    def flops(tokens: int) -> int:
        """FLOPs of one pair's forward + backward at a padded caption length (per-pair cost is linear in batch)."""
        ids = torch.full((1, tokens), 1000, dtype=torch.long, device="meta")
        counter = FlopCounterMode(display=False)
        with counter:
            logits = model(pixel_values=torch.zeros(1, 3, size, size, device="meta"), input_ids=ids,
                           attention_mask=torch.ones_like(ids)).logits
            caption_loss(logits, ids, 0.1).backward()
        return counter.get_total_flops()

    print(f"# padding: {'tiny (smoke)' if args.smoke else 'BLIP-base 384 px'}, {args.captions} captions of "
          f"{args.min_words}-{args.max_words} words ({min(lengths)}-{max(lengths)} tokens, mean "
          f"{sum(lengths) / len(lengths):.1f}), batch {args.batch_size}")
    print("\n| order | padded tokens | of which padding | GFLOP per pair | x shuffled |\n|---|---|---|---|---|")
    base = None
    for name, batches in (("shuffled (captune's default)", shuffled(lengths, args.batch_size, rng)),
                          ("length-grouped (mega-batches of 50)", length_grouped(lengths, args.batch_size, rng))):
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        total = sum(len(b) * flops(max(lengths[i] for i in b)) for b in batches) / len(lengths)
        base = base or total
        print(f"| {name} | {padded} | {100 * (1 - sum(lengths) / padded):.1f}% | {total / 1e9:.1f} | "
              f"{base / total:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
