"""Captioning throughput: transformers' pipeline one image at a time versus captune's batched captioning.

    python benchmarks/caption.py                 # full-size BLIP-base, 32 JPEGs, greedy and beam 3
    python benchmarks/caption.py --images 16 --modes 3
    python benchmarks/caption.py --smoke         # tiny model, seconds (the test suite runs this)

Baseline: `pipeline("image-text-to-text", model=..., processor=...)` called per image file (transformers 5.24
removed the `image-to-text` task name; it now resolves to this pipeline). captune: `captune.generate.caption_images`
on batches of `--batch-size` images, with SDPA attention (`captune-eager` rows: the same without SDPA;
`captune-int8` rows: SDPA plus `captune.speed.quantize_int8`, i.e. `captune caption --int8`).
Both read and decode the JPEGs inside the timed region. Random weights never emit [SEP], so captions run to the cap;
`min_new_tokens = max_new_tokens` makes every variant decode exactly the same number of tokens.

int8 agreement with fp32 captune, printed after the table: the cosine between the two ViTs' output embeddings, and
the fraction of caption words equal at the same position. With random weights the decoder's logits are nearly flat,
so one flipped argmax changes the rest of the caption: the word figure is a floor, not what a trained model sees
(tests/test_int8.py measures caption agreement on a trained tiny model).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, machine, write_images  # noqa: E402

from captune.data.records import load_rgb  # noqa: E402
from captune.generate import GenerationOptions, caption_images  # noqa: E402
from captune.speed import disable_sdpa, enable_sdpa, quantize_int8  # noqa: E402


def time_pipeline(model, processor, paths, beams: int, tokens: int) -> tuple[float, list[str]]:
    captioner = pipeline("image-text-to-text", model=model, processor=processor, device="cpu")
    kwargs = {"max_new_tokens": tokens, "min_new_tokens": tokens, "num_beams": beams}
    start = time.perf_counter()
    captions = [captioner(images=str(path), text="", generate_kwargs=kwargs)[0]["generated_text"] for path in paths]
    return time.perf_counter() - start, captions


def time_captune(model, processor, paths, beams: int, tokens: int, batch_size: int) -> tuple[float, list[str]]:
    options = GenerationOptions(num_beams=beams, max_new_tokens=tokens, min_new_tokens=tokens)
    start = time.perf_counter()
    images = [load_rgb(path) for path in paths]
    captions = caption_images(model, processor, images, options, batch_size=batch_size)
    return time.perf_counter() - start, captions


def vision_cosine(model, quantized, processor, paths) -> float:
    """Mean cosine between the fp32 and int8 ViTs' output embeddings (first 8 images, flattened per image)."""
    pixel_values = processor.image_processor([load_rgb(p) for p in paths[:8]], return_tensors="pt")["pixel_values"]
    reference = model.vision_model(pixel_values=pixel_values)[0].flatten(1)
    candidate = quantized.vision_model(pixel_values=pixel_values)[0].flatten(1)
    return torch.nn.functional.cosine_similarity(candidate, reference).mean().item()


def caption_agreement(fp32_captions, int8_captions) -> dict:
    """Position-wise word agreement and the fraction of identical captions."""
    words = [(a.split(), b.split()) for a, b in zip(fp32_captions, int8_captions)]
    same = sum(x == y for a, b in words for x, y in zip(a, b)) / max(1, sum(len(a) for a, _ in words))
    identical = sum(a == b for a, b in zip(fp32_captions, int8_captions)) / len(fp32_captions)
    return {"word_agreement": same, "identical_captions": identical}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--modes", type=int, nargs="+", default=[1, 3], help="beam widths (1 = greedy)")
    parser.add_argument("--no-eager", action="store_true", help="skip the captune-eager (no SDPA) ablation")
    parser.add_argument("--no-int8", action="store_true", help="skip the captune-int8 (SDPA + int8) variant")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 images, 3 tokens, no ablation")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.max_new_tokens, args.no_eager = 2, 3, True
    info = machine()
    print(f"# caption: {'tiny (smoke)' if args.smoke else 'BLIP-base, 384 px, random weights'}, fp32, "
          f"{args.images} JPEGs, {args.max_new_tokens} new tokens each; {info}", flush=True)
    model, processor, _ = build_model(args.smoke)
    model.eval()
    torch.set_grad_enabled(False)
    results, agreement = [], {}
    # Quantized once, outside the timed region, as `captune caption --int8` does at load.
    quantized = None
    if not args.no_int8:
        quantized = quantize_int8(copy.deepcopy(model))
        enable_sdpa(quantized)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images, size=(160, 120) if args.smoke else (640, 480))
        # Warm-up: first calls allocate and pick kernels.
        time_captune(model, processor, paths[:2], 1, 2, 2)
        if quantized is not None:
            time_captune(quantized, processor, paths[:2], 1, 2, 2)
        for beams in args.modes:
            variants = (["pipeline", "captune"] + ([] if quantized is None else ["captune-int8"])
                        + ([] if args.no_eager else ["captune-eager"]))
            by_variant = {}
            for variant in variants:
                if variant == "pipeline":
                    disable_sdpa(model)
                    seconds, captions = time_pipeline(model, processor, paths, beams, args.max_new_tokens)
                elif variant == "captune-int8":
                    seconds, captions = time_captune(quantized, processor, paths, beams, args.max_new_tokens,
                                                     args.batch_size)
                else:
                    (enable_sdpa if variant == "captune" else disable_sdpa)(model)
                    seconds, captions = time_captune(model, processor, paths, beams, args.max_new_tokens,
                                                     args.batch_size)
                words = sum(len(c.split()) for c in captions) / len(captions)
                results.append({"variant": variant, "num_beams": beams, "images": len(paths), "seconds": seconds,
                                "captions_per_s": len(paths) / seconds, "mean_words": words})
                by_variant[variant] = captions
                print(f"  {variant:14s} beams {beams}: {len(paths) / seconds:7.3f} captions/s "
                      f"({seconds:.1f} s, {words:.1f} words/caption)", flush=True)
            if quantized is not None:
                agreement[beams] = caption_agreement(by_variant["captune"], by_variant["captune-int8"])
        cosine = None if quantized is None else vision_cosine(model, quantized, processor, paths)
    print("\n| decoding | variant | captions/s | x pipeline |\n|---|---|---|---|")
    for beams in args.modes:
        rows = [r for r in results if r["num_beams"] == beams]
        base = rows[0]["captions_per_s"]
        for r in rows:
            mode = "greedy" if beams == 1 else f"beam {beams}"
            print(f"| {mode} | {r['variant']} | {r['captions_per_s']:.3f} | {r['captions_per_s'] / base:.2f}x |")
    if cosine is not None:
        print(f"\nint8 vs fp32: vision embedding cosine {cosine:.4f}")
    for beams, a in agreement.items():
        mode = "greedy" if beams == 1 else f"beam {beams}"
        print(f"int8 vs fp32 captune, {mode}: words equal at the same position {a['word_agreement']:.1%}, identical "
              f"captions {a['identical_captions']:.0%} (random weights: a floor, see the module docstring)")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results, "int8_vision_cosine": cosine,
                                         "int8_agreement": agreement}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
