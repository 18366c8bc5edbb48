"""GPU throughput of BLIP-base fine-tuning and captioning; run through benchmarks/gpu.sh on the GPU machine.

    bash benchmarks/gpu.sh                           # H200: full-size BLIP-base, random weights, offline
    python benchmarks/gpu_bench.py --smoke           # tiny model on CPU, seconds (the test suite runs this)

Sections (each reports samples/s, model FLOPs utilisation and peak memory):
    full           full fine-tuning, bf16 autocast, 384 px, SDPA, fused AdamW, caption length --tokens
    frozen-vision  the same with the ViT frozen (no vision backward, no vision optimizer state)
    lora           LoRA r=16 on every attention and MLP projection of both towers (peft)
    full grouped   `full` with caption_sampling grouped: 5 captions per image (COCO), one ViT pass per image
    notebook       the seed notebook's recipe: fp32, eager attention, captions padded to 512, labels=input_ids,
                   AdamW(model.parameters()), batch 2
    full+compile   `full` with torch.compile (only with --compile)
    caption beam 3 batched beam search (bf16 autocast on GPU, SDPA), `--tokens` new tokens forced per caption
Batches are prepared tensors already on the device: this measures the model step, not image decoding.
FLOPs come from torch.utils.flop_counter on one real step (matmuls and attention; elementwise ops not counted).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, machine, peak_rss_mib  # noqa: E402

from captune.generate import GenerationOptions, caption_pixels  # noqa: E402
from captune.speed import disable_sdpa, enable_sdpa, share_images  # noqa: E402
from captune.train import caption_loss, parameter_groups  # noqa: E402

# Dense bf16 tensor-core peak without sparsity (NVIDIA H100/H200 SXM datasheets: 989.4 TFLOPS).
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def synthetic_batch(batch_size: int, size: int, tokens: int, device, notebook: bool = False,
                    captions_per_image: int = 1) -> dict:
    """`batch_size` captions; with `captions_per_image` > 1, that many share each image (grouped sampling)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch_size, tokens), generator=generator)
    ids[:, 0] = 101 if notebook else 30522  # the notebook keeps [CLS]; captune trains on bos [DEC]
    ids[:, -1] = 102
    labels = ids.clone()
    images = -(-batch_size // captions_per_image)
    batch = {"pixel_values": torch.randn(images, 3, size, size, generator=generator).to(device),
             "input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}
    if captions_per_image > 1:
        batch["image_index"] = (torch.arange(batch_size) // captions_per_image).to(device)
    return batch


def reset_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_mib() / 1024  # the process's peak RSS: an upper bound, cumulative over sections


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(model, batch: dict, *, device, notebook: bool, autocast: bool, warmup: int, steps: int,
                  compile: bool = False) -> dict:
    """Warm up, count one step's FLOPs, then time `steps` optimizer steps."""
    model.train()
    if notebook:
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    else:
        optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-5, fused=True)
    forward = torch.compile(model) if compile else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if notebook:
                loss = forward(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                               labels=batch["input_ids"]).loss
            else:
                with share_images(model.vision_model, batch.get("image_index")):
                    out = forward(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"])
                loss = caption_loss(out.logits, batch["labels"], 0.1)
        loss.backward()
        if not notebook:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_memory(device)
    for _ in range(warmup):
        step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    batch_size = batch["input_ids"].shape[0]
    result = {"samples_per_s": batch_size * steps / seconds, "flops_per_sample": flops / batch_size,
              "peak_memory_gib": peak_memory_gib(device), "batch_size": batch_size,
              "text_tokens": batch["input_ids"].shape[1]}
    peak = peak_flops(device)
    result["mfu"] = flops * steps / seconds / peak if peak else None
    del optimizer
    return result


def time_captioning(model, size: int, *, device, images: int, beams: int, tokens: int) -> dict:
    model.eval()
    reset_memory(device)
    pixels = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    options = GenerationOptions(num_beams=beams, max_new_tokens=tokens, min_new_tokens=tokens)
    processor = _processor(pixels.shape[-1])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        caption_pixels(model, processor, pixels[:2], options)  # warm-up
        sync(device)
        start = time.perf_counter()
        caption_pixels(model, processor, pixels, options)
        sync(device)
    seconds = time.perf_counter() - start
    return {"captions_per_s": images / seconds, "peak_memory_gib": peak_memory_gib(device), "batch_size": images}


def _processor(size: int):
    from transformers import BlipProcessor

    from captune.models.blip import blip_tokenizer, image_processor

    return BlipProcessor(image_processor=image_processor(size), tokenizer=blip_tokenizer())


def lora_model(model):
    from peft import LoraConfig, get_peft_model

    targets = ["qkv", "projection", "fc1", "fc2", "query", "key", "value", "dense"]
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=20, help="caption length in tokens (COCO's is about 14-20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--caption-images", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="also time full fine-tuning under torch.compile")
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU-sized: 1 warm-up, 1 timed step")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.batch_size, args.tokens, args.warmup, args.steps, args.caption_images = 2, 6, 1, 1, 2
    autocast = device.type == "cuda"  # bf16 autocast is slow on CPUs: the smoke path runs fp32
    info = machine()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    print(f"# gpu_bench on {device} ({info.get('gpu', info['cpu'])}), "
          f"{'tiny (smoke)' if args.smoke else 'BLIP-base 384 px, random weights'}; {info}", flush=True)
    results: dict[str, dict] = {}

    def report(name: str, result: dict) -> None:
        results[name] = result
        print(f"  {name}: {json.dumps(result)}", flush=True)

    model, _, size = build_model(args.smoke)
    model.to(device)
    enable_sdpa(model)
    batch = synthetic_batch(args.batch_size, size, args.tokens, device)
    timing = dict(device=device, autocast=autocast, warmup=args.warmup, steps=args.steps)
    report("full", time_training(model, batch, notebook=False, **timing))
    grouped = synthetic_batch(args.batch_size, size, args.tokens, device, captions_per_image=5)
    report("full grouped", time_training(model, grouped, notebook=False, **timing))
    del grouped

    model.vision_model.requires_grad_(False)
    report("frozen-vision", time_training(model, batch, notebook=False, **timing))
    model.vision_model.requires_grad_(True)

    try:
        import peft  # noqa: F401
    except ImportError:
        print("  lora: skipped, peft is not installed", flush=True)
        results["lora"] = None
    else:
        fresh, _, _ = build_model(args.smoke, seed=1)
        lora = lora_model(fresh.to(device))
        enable_sdpa(lora)
        report("lora", time_training(lora, batch, notebook=False, **timing))
        del lora, fresh

    report("caption beam 3", time_captioning(model, size, device=device, images=args.caption_images, beams=3,
                                             tokens=args.tokens))

    if args.compile:
        report("full+compile", time_training(model, batch, notebook=False, compile=True, **timing))

    disable_sdpa(model)
    max_tokens = model.config.text_config.max_position_embeddings
    notebook_batch = synthetic_batch(2, size, max_tokens, device, notebook=True)
    notebook_timing = dict(timing, autocast=False)
    report("notebook", time_training(model, notebook_batch, notebook=True, **notebook_timing))

    print("\n| section | batch | samples/s (captions/s) | MFU | peak memory GiB |\n|---|---|---|---|---|")
    for name, r in results.items():
        if r is None:
            print(f"| {name} | - | skipped | - | - |")
            continue
        rate = r.get("samples_per_s", r.get("captions_per_s"))
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        print(f"| {name} | {r['batch_size']} | {rate:.2f} | {mfu} | {r['peak_memory_gib']:.2f} |")
    if results.get("notebook"):
        full = results["full"]["samples_per_s"] / results["notebook"]["samples_per_s"]
        print(f"\nfull fine-tuning (batch {args.batch_size}, bf16) vs notebook recipe (batch 2, fp32): {full:.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
