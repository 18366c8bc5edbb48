"""Training throughput: captune's loop against plain transformers (and the seed notebook), same model, same batch.

    python benchmarks/train_step.py                      # full-size BLIP-base, batch 2 and 8
    python benchmarks/train_step.py --model git --batch-sizes 2 --warmup 1 --steps 3
    python benchmarks/train_step.py --objective scst --batch-sizes 2   # SCST against cross-entropy, BLIP-base
    python benchmarks/train_step.py --model blip2 --device cuda      # BLIP-2 OPT-2.7B: GPU only (see gpu.sh)
    python benchmarks/train_step.py --smoke --model blip2 git florence2   # tiny presets, seconds (the tests run this)

--model (one or more): blip (BLIP-base), blip2 (BLIP-2 OPT-2.7B), blip2-t5 (BLIP-2 Flan-T5-XL), git (GIT-base),
florence2 (Florence-2-base), paligemma (PaliGemma 3B, 224 px): the full-size architecture built from its config with
random weights (the compute is the checkpoint's; nothing is downloaded; see common.FAMILIES), or with --smoke the
family's tiny preset. --mode is what trains (full, frozen-vision, lora, BLIP-2's frozen-lm; default: the family's
default for the checkpoint), the same for every variant; each row prints its trainable parameter count so the
comparison can be checked.

Variants (each in its own subprocess, so peak memory is its own; --smoke runs them in-process):
    transformers  the plain transformers (+ peft for --mode lora) fine-tuning loop: a DataLoader whose collate_fn
                  calls the processor on the batch (dynamic padding), `labels` = input_ids with padding -100 (decoder
                  targets for the encoder-decoders: Florence-2 with its `<CAPTION>` prompt, BLIP-2 Flan-T5;
                  PaliGemma's processor `suffix=` labels after "caption en"), the model's own loss,
                  `AdamW(model.parameters())`, transformers' default attention; the freezing or LoRA adapters of
                  --mode written as a user would (`requires_grad_`, `LoraConfig(target_modules=[...])`).
    notebook      (BLIP only) the seed notebook: a Dataset calling `processor(images=..., text=...,
                  padding="max_length")` per sample (512 tokens), `model(input_ids, pixel_values, labels=input_ids)`.
    captune-eager captune's real training path without the speed levers: the family's `tokenize` through
                  CaptionCollator, `finetune.apply_mode`, the family's `loss_sum` (label smoothing 0.1), decay groups,
                  grad clipping, Accelerate; transformers' eager attention where captune has its own SDPA.
    captune       the same plus the levers train.py applies: the family's SDPA attention and fused AdamW.
    captune-compile  the same plus torch.compile (opt-in: `--variants ... captune-compile`).
    captune-grouped  `captune` with `data.caption_sampling: grouped`: an image's captions batched together and its
                  vision pass shared (meaningful with `--captions-per-image` > 1, e.g. 5 as in COCO).
    captune-scst  `--objective scst`: captune's SCST step (captune.scst: k sampled captions per image, CIDEr-D
                  rewards, `scst_backward_window`), compared with `captune` (cross-entropy) at the same batch of
                  images. Random weights never end a caption early, so every sample runs to the family's
                  eval.max_new_tokens (BLIP: 16): an upper bound on a trained model's sampling cost.
"label width": positions per row of the labels the loss reads (BLIP-2 OPT's include its 32 image placeholders;
the encoder-decoders' are the decoder's; SCST's: sampled tokens per caption).
All decode JPEGs inside the timed loop (DataLoader num_workers=0: on a 2-core machine workers only steal cores).
samples/s counts training images a second (= image-caption pairs for cross-entropy with one caption per image).
On CUDA every variant runs under bf16 autocast (fp32 weights), as `captune train --mixed-precision bf16`.
Ratios are against `notebook` when it runs, else `transformers`, else the first variant listed.

    python benchmarks/train_step.py --captions-per-image 5 --batch-sizes 10 --variants captune captune-grouped
"""

from __future__ import annotations

import argparse
import contextlib
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
from common import FAMILIES, build_family, machine, peak_rss_mib, random_caption, run_worker, write_images  # noqa: E402

from captune.data.collate import CaptionCollator, CaptionPairs, ItemOptions  # noqa: E402
from captune.data.records import CaptionSample  # noqa: E402
from captune.data.sampling import EpochSampler  # noqa: E402
from captune.finetune import apply_mode  # noqa: E402
from captune.models import PRESETS, family_module, family_of  # noqa: E402
from captune.scst import ScstCollator, ScstImages, build_scst, scst_backward_window  # noqa: E402
from captune.speed import apply_speed_levers, share_images  # noqa: E402
from captune.train import parameter_groups  # noqa: E402

VARIANTS = ("notebook", "transformers", "captune-eager", "captune", "captune-compile", "captune-grouped",
            "captune-scst")
# How a plain script freezes a family's vision tower, and the LoRA targets it names: the same modules captune's
# family code picks (each row's trainable parameter count shows it).
PLAIN_VISION = {"blip": "vision_model", "blip2": "vision_model", "blip2-t5": "vision_model",
                "git": "git.image_encoder", "florence2": "model.vision_tower", "paligemma": "model.vision_tower",
                "smolvlm": "model.vision_model"}
PLAIN_LORA_TARGETS = {"blip": ["query", "value"], "blip2": ["q_proj", "v_proj"], "blip2-t5": ["q", "v"],
                      "git": ["query", "value"], "florence2": ["q_proj", "v_proj"],
                      # Gemma's attention alone: the bare names would also adapt SigLIP's q/k/v_proj.
                      "paligemma": r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
                      "smolvlm": r".*text_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"}
FLORENCE_TASK = "<CAPTION>"
PALIGEMMA_PREFIX = "caption en"
SMOLVLM_INSTRUCTION = "Describe this image in one sentence."


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


class ImageCaptionDataset(Dataset):
    """A plain script's dataset: (decoded image, caption) pairs; the processor runs in the collate_fn."""

    def __init__(self, paths, captions):
        self.paths, self.captions = paths, captions

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return Image.open(self.paths[index]).convert("RGB"), self.captions[index]


def plain_collate(model_name: str, processor):
    """The batch a plain transformers script builds: the processor over the whole batch, padded to its longest."""
    if isinstance(getattr(processor, "image_token", None), str) and model_name.startswith("blip2"):
        # captune's BLIP-2 processors hold the image token as a str (tokenizer.image_token), and transformers'
        # Blip2Processor.__call__ reads `.content` off it: the AddedToken it would have made itself.
        from tokenizers import AddedToken

        processor.image_token = AddedToken(processor.image_token, normalized=False, special=True)

    def collate(items):
        images, captions = [i for i, _ in items], [c for _, c in items]
        if model_name == "paligemma":
            # The prefix with its <image> placeholder, the caption as `suffix`: the processor's own labels, and
            # token_type_ids the forward needs for its bidirectional prefix (so they are kept, unlike GIT's).
            text = ["<image>" + PALIGEMMA_PREFIX] * len(images)
            return dict(processor(images=images, text=text, suffix=captions, padding=True, return_tensors="pt"))
        if model_name == "smolvlm":
            # The chat template over the whole conversation, labels = input_ids with padding and the image tokens
            # -100, as a plain fine-tuning script masks them; the processor expects one image list per row.
            text = [processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SMOLVLM_INSTRUCTION}]},
                 {"role": "assistant", "content": [{"type": "text", "text": c}]}]) for c in captions]
            inputs = dict(processor(images=[[i] for i in images], text=text, padding=True, return_tensors="pt"))
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
            return {**inputs, "labels": labels.masked_fill(inputs["input_ids"] == processor.image_token_id, -100)}
        if model_name in ("florence2", "blip2-t5"):  # encoder-decoders: the caption is the decoder's target
            prompt = FLORENCE_TASK if model_name == "florence2" else ""
            inputs = processor(images=images, text=[prompt] * len(images), padding=True, return_tensors="pt")
            target = processor.tokenizer(captions, padding=True, return_tensors="pt")
            labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
        else:
            inputs = processor(images=images, text=captions, padding=True, return_tensors="pt")
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        inputs = dict(inputs)
        inputs.pop("token_type_ids", None)  # GIT's tokenizer returns them; its forward does not take them
        return {**inputs, "labels": labels}

    return collate


def plain_mode(model, model_name: str, mode: str):
    """--mode as a plain script writes it: requires_grad_ on a submodule, or peft with a target_modules list."""
    if mode == "frozen-vision":
        model.get_submodule(PLAIN_VISION[model_name]).requires_grad_(False)
    elif mode == "frozen-lm":
        model.language_model.requires_grad_(False)
    elif mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=PLAIN_LORA_TARGETS[model_name],
                            bias="none")
        model = get_peft_model(model, config)
    elif mode != "full":
        raise SystemExit(f"--mode {mode} is not a mode of {model_name}")
    return model


def default_mode(model_name: str) -> str:
    """The family's default training mode for the full-size checkpoint (BLIP-2: frozen-lm; the others: full)."""
    hub_id, preset = FAMILIES[model_name]
    return family_module(PRESETS[preset]).defaults(hub_id).get("train.mode", "full")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_variant(variant: str, batch_size: int, warmup: int, steps: int, smoke: bool, images: Path,
                per_image: int = 1, *, model_name: str = "blip", mode: str | None = None, device: str = "cpu",
                scst_samples: int = 5) -> dict:
    """Time `warmup + steps` optimizer steps of one variant; return samples/s, trainable parameters, peak memory."""
    device = torch.device(device)
    mode = mode or default_mode(model_name)
    model, processor, stands_for = build_family(model_name, smoke, device=device)
    model.train()
    paths = sorted(images.glob("*.jpg"))
    rng = random.Random(0)
    captions = [tuple(random_caption(rng) for _ in range(per_image)) for _ in paths]
    pairs = [(p, c) for p, cs in zip(paths, captions) for c in cs]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    if variant in ("notebook", "transformers"):
        if variant == "notebook":
            if model_name != "blip" or mode != "full":
                raise SystemExit("the notebook variant is the seed notebook's BLIP recipe: --model blip --mode full")
            dataset = NotebookDataset([p for p, _ in pairs], [c for _, c in pairs], processor)
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
        else:
            model = plain_mode(model, model_name, mode)
            dataset = ImageCaptionDataset([p for p, _ in pairs], [c for _, c in pairs])
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                collate_fn=plain_collate(model_name, processor))
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)

        def step(batch: dict) -> tuple[torch.Tensor, int]:
            batch = to_device(batch, device)
            with autocast:
                if variant == "notebook":
                    loss = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                                 labels=batch["input_ids"]).loss
                else:
                    loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss, batch["input_ids"].shape[1] if variant == "notebook" else batch["labels"].shape[1]
    else:
        from accelerate import Accelerator

        family = family_of(model)
        defaults = family.defaults(stands_for)
        levers = variant != "captune-eager"
        model = apply_mode(model, mode)
        apply_speed_levers(model, sdpa=levers, compile=variant == "captune-compile")
        collator = CaptionCollator(processor, max_tokens=defaults["data.max_caption_tokens"], family=family)
        samples = [CaptionSample(id=p.name, captions=c, image=p) for p, c in zip(paths, captions)]
        if variant == "captune-scst":
            items = ScstImages(samples, ItemOptions())
            batch_collator = ScstCollator(lambda images: family.pixel_values(processor, images), processor)
            setup = build_scst(samples, samples=scst_samples, baseline="mean", prompt="",
                               max_new_tokens=defaults["eval.max_new_tokens"], tokenize=collator.tokenize)
        else:
            items = CaptionPairs(samples, "grouped" if variant == "captune-grouped" else "all")
            batch_collator = collator
        sampler = EpochSampler(len(items), 0, groups=items.groups())
        loader = DataLoader(items, batch_size=batch_size, sampler=sampler, collate_fn=batch_collator)
        optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-5, fused=levers)
        # Accelerate as train.py uses it: bf16 autocast on a GPU, plain fp32 on the CPU.
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")
        model, optimizer = accelerator.prepare(model, optimizer)
        vision = family.vision_tower(accelerator.unwrap_model(model))
        position = iter(range(10**9))

        def step(batch: dict) -> tuple[torch.Tensor, float]:
            batch = to_device(batch, accelerator.device)
            if variant == "captune-scst":
                loss, tokens, _ = scst_backward_window(setup, accelerator, model, vision, [batch], processor=processor,
                                                       seed=0, epoch=0, first_batch=next(position))
                width = float(tokens) / (batch["pixel_values"].shape[0] * scst_samples)  # sampled tokens a caption
            else:
                batch.pop("pairs")
                with share_images(vision, batch.get("image_index")):
                    loss = family.loss_sum(model, batch, label_smoothing=0.1) / family.target_tokens(batch).clamp(min=1)
                accelerator.backward(loss)
                width = batch["labels"].shape[1]
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss, width

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def batches():
        while True:
            yield from loader

    times, tokens, cpu = [], [], 0.0
    stream = batches()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for index in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss, width = step(next(stream))
        loss.item()  # waits for the device: the step is done
        if index >= warmup:
            times.append(time.perf_counter() - start)
            cpu += time.process_time() - cpu_start
            tokens.append(width)
    result = {
        "variant": variant, "model": model_name, "stands_for": stands_for, "mode": mode, "device": device.type,
        "batch_size": batch_size, "steps": steps, "captions_per_image": per_image, "trainable_params": trainable,
        "samples_per_s": batch_size * steps / sum(times), "median_step_s": statistics.median(times),
        "text_tokens": statistics.mean(tokens), "peak_rss_mib": peak_rss_mib(),
        # CPU seconds per sample (all threads): less sensitive than wall time to other jobs on a shared machine.
        "cpu_s_per_sample": cpu / (batch_size * steps),
    }
    if device.type == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if variant == "captune-scst":
        result["scst_samples"] = scst_samples
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=list(FAMILIES), default=["blip"],
                        help="model families to measure, one after the other (default: blip)")
    parser.add_argument("--mode", help="what trains, for every variant (default: the family's default mode)")
    parser.add_argument("--objective", choices=("ce", "scst"), default="ce",
                        help="scst: time captune's SCST step against its cross-entropy step (variants captune and "
                             "captune-scst)")
    parser.add_argument("--scst-samples", type=int, default=5, help="captions sampled per image by SCST (k)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        help="default: notebook transformers captune-eager captune for blip (full mode), transformers "
                             "captune otherwise, captune captune-scst with --objective scst")
    parser.add_argument("--captions-per-image", type=int, default=1, help="captions each image has (COCO: 5)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny presets, 1 warm-up + 1 timed step, variants in this process")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "MODEL", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.warmup, args.steps = 1, 1
    if args.worker:
        variant, model_name, images = args.worker
        result = run_variant(variant, args.batch_sizes[0], args.warmup, args.steps, args.smoke, Path(images),
                             args.captions_per_image, model_name=model_name, mode=args.mode, device=args.device,
                             scst_samples=args.scst_samples)
        print(json.dumps(result))
        return 0

    info = machine()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    print(f"# train_step: {' '.join(args.model)}{' (tiny presets, smoke)' if args.smoke else ', full-size, random weights'}, "
          f"{'bf16 autocast' if args.device.startswith('cuda') else 'fp32'} on {args.device}, objective "
          f"{args.objective}, {args.warmup} warm-up + {args.steps} timed steps, {args.captions_per_image} caption(s) "
          f"per image; {info}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        count = max(args.batch_sizes) * (args.warmup + args.steps)
        write_images(Path(tmp), count, size=(160, 120) if args.smoke else (640, 480))
        for model_name in args.model:
            variants = args.variants or (["captune", "captune-scst"] if args.objective == "scst" else
                                         ["notebook", "transformers", "captune-eager", "captune"]
                                         if model_name == "blip" and args.mode in (None, "full")
                                         else ["transformers", "captune"])
            for batch_size in args.batch_sizes:
                for variant in variants:
                    if args.smoke:  # tiny models: one process is enough, and saves an interpreter start per row
                        result = run_variant(variant, batch_size, args.warmup, args.steps, True, Path(tmp),
                                             args.captions_per_image, model_name=model_name, mode=args.mode,
                                             device=args.device, scst_samples=args.scst_samples)
                    else:
                        common = ["--batch-sizes", str(batch_size), "--warmup", str(args.warmup), "--steps",
                                  str(args.steps), "--captions-per-image", str(args.captions_per_image), "--device",
                                  args.device, "--scst-samples", str(args.scst_samples),
                                  *(["--mode", args.mode] if args.mode else [])]
                        result = run_worker(Path(__file__), [variant, model_name, tmp, *common])
                    results.append(result)
                    print(f"  {model_name} {result['mode']} {variant:16s} batch {batch_size:2d}: "
                          f"{result['samples_per_s']:7.3f} samples/s (median step {result['median_step_s']:.2f} s, "
                          f"label width {result['text_tokens']:.0f}, {result['trainable_params'] / 1e6:.1f} M "
                          f"trainable, peak {peak_gib(result):.2f} GiB)", flush=True)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=1))
    return 0


def peak_gib(result: dict) -> float:
    """Peak GPU memory on CUDA, else the worker's peak RSS."""
    return result.get("peak_gpu_gib", result["peak_rss_mib"] / 1024)


def print_table(results: list[dict]) -> None:
    """One markdown table; each (model, batch) group's ratios are against its baseline variant."""
    print("\n| model | mode | batch | variant | samples/s | x baseline | CPU s/sample | x baseline (CPU time) | "
          "trainable M | label width | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|---|")
    groups = {}
    for r in results:
        groups.setdefault((r["model"], r["batch_size"]), []).append(r)
    for rows in groups.values():
        names = [r["variant"] for r in rows]
        baseline = next((b for b in ("notebook", "transformers") if b in names), names[0])
        base = next(r for r in rows if r["variant"] == baseline)
        for r in rows:
            print(f"| {r['model']} | {r['mode']} | {r['batch_size']} | {r['variant']} | {r['samples_per_s']:.3f} | "
                  f"{r['samples_per_s'] / base['samples_per_s']:.2f}x {baseline} | {r['cpu_s_per_sample']:.2f} | "
                  f"{base['cpu_s_per_sample'] / r['cpu_s_per_sample']:.2f}x | {r['trainable_params'] / 1e6:.2f} | "
                  f"{r['text_tokens']:.1f} | {peak_gib(r):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
