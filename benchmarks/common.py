"""Shared pieces of the benchmarks: full-size architectures of every model family, generated JPEGs, worker subprocesses.

Nothing here downloads anything: models are randomly initialised (the compute is the same as the real checkpoint's),
images are generated.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from captune.models.blip import TINY_IMAGE_SIZE, blip_tokenizer, image_processor, tiny_config  # noqa: E402

WORDS = ("a man woman dog cat red blue small large sitting standing on in the of with next to near a field street "
         "table plate of food tree building car bus train water beach snow holding two three people").split()


def blip_base_config() -> BlipConfig:
    """BLIP-base's sizes (Salesforce/blip-image-captioning-base): BlipConfig's defaults, checked here.

    The vision tower's `initializer_range` defaults to 1e-10 (a nearly constant ViT); the checkpoint uses 0.02.
    """
    config = BlipConfig(vision_config={"initializer_range": 0.02})
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (768, 12, 384, 16)
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (768, 12, 30524)
    return config


def build_model(smoke: bool, seed: int = 0) -> tuple[BlipForConditionalGeneration, BlipProcessor, int]:
    """A random-weight BLIP (full BLIP-base, or captune's tiny preset for --smoke), its processor, its image size."""
    torch.manual_seed(seed)
    config = tiny_config() if smoke else blip_base_config()
    size = TINY_IMAGE_SIZE if smoke else config.vision_config.image_size
    model = BlipForConditionalGeneration(config)
    tokenizer = blip_tokenizer()
    # padding="max_length" pads to this: 512 for BLIP-base (as the real processor), the tiny model's 64 for --smoke.
    tokenizer.model_max_length = config.text_config.max_position_embeddings
    processor = BlipProcessor(image_processor=image_processor(size), tokenizer=tokenizer)
    return model, processor, size


# `--model` of the benchmarks -> (the checkpoint whose architecture `build_family` builds with random weights, the
# captune preset `--smoke` uses instead). The tokenizers of OPT, T5 and Florence-2 cannot ship offline: their
# full-size stand-ins keep the real vocabulary *size* (the embedding and LM-head compute) with captune's small
# offline BPE, so caption token counts differ a little from the real tokenizers' (each run prints its own).
FAMILIES = {
    "blip": ("Salesforce/blip-image-captioning-base", "tiny"),
    "blip2": ("Salesforce/blip2-opt-2.7b", "tiny-blip2"),
    "blip2-t5": ("Salesforce/blip2-flan-t5-xl", "tiny-blip2-t5"),
    "git": ("microsoft/git-base", "tiny-git"),
    "florence2": ("florence-community/Florence-2-base", "tiny-florence2"),
    "paligemma": ("google/paligemma-3b-pt-224", "tiny-paligemma"),
    "smolvlm": ("HuggingFaceTB/SmolVLM-256M-Instruct", "tiny-smolvlm"),
}


def git_base_config():
    """microsoft/git-base's sizes: GitConfig's defaults (CLIP ViT-B/16 at 224 px, 6-layer 768-wide decoder), checked."""
    from transformers import GitConfig

    config = GitConfig()
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (768, 12, 224, 16)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size, config.bos_token_id) == (768, 6, 30522, 101)
    return config


def florence2_base_config(tokenizer):
    """florence-community/Florence-2-base's sizes (0.23 B parameters): DaViT (depths 1-1-9-1, widths 128-1024,
    window 12, 768 px -> 577 image rows) and a 6+6-layer 768-wide BART with its 51,289-token vocabulary; the special
    token ids are the offline tokenizer's. Florence2Config's own text defaults are the large model's (1024 wide)."""
    from transformers import BartConfig, Florence2Config

    vision = dict(depths=[1, 1, 9, 1], embed_dim=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32],
                  num_groups=[4, 8, 16, 32], window_size=12, projection_dim=768)
    text = BartConfig(vocab_size=51289, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                      decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                      max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id)
    return Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)


def build_family(name: str, smoke: bool, seed: int = 0, device: str | torch.device = "cpu"):
    """(model, processor, what it stands for): a `FAMILIES` entry's full-size architecture with random weights, or
    with `smoke` captune's tiny preset of that family (loaded through the family's own `load`).

    The model is built on `device` directly (a 3.7 B BLIP-2 initialises in seconds on a GPU, minutes on a CPU), in
    fp32, with the attention transformers picks by default; captune's speed levers are applied by the caller.
    """
    from captune.models import PRESETS, family_module

    hub_id, preset = FAMILIES[name]
    torch.manual_seed(seed)
    if name == "blip":
        model, processor, _ = build_model(smoke, seed)
        return model.to(device), processor, "tiny" if smoke else hub_id
    family = family_module(PRESETS[preset])
    if smoke:
        model, processor = family.load(preset, seed=seed)
        return model.to(device), processor, preset
    with torch.device(device):
        if name in ("blip2", "blip2-t5"):
            model, processor = _blip2_full_size(name, preset, family)
        elif name == "git":
            from transformers import GitForCausalLM, GitProcessor

            model = GitForCausalLM(git_base_config())
            processor = GitProcessor(image_processor=family.image_processor(224), tokenizer=family.git_tokenizer())
        elif name == "paligemma":
            model, processor = _paligemma_full_size(family)
        elif name == "smolvlm":
            model, processor = _smolvlm_full_size(family)
        else:
            from transformers import Florence2ForConditionalGeneration, Florence2Processor

            tokenizer = family.tiny_tokenizer()
            config = florence2_base_config(tokenizer)
            model = Florence2ForConditionalGeneration(config)
            processor = Florence2Processor(
                image_processor=family.image_processor(768, family.vision_seq_length(config, 768)),
                tokenizer=tokenizer, post_processor_config=family.POST_PROCESSOR_CONFIG)
    return model, processor, hub_id


def _paligemma_full_size(family):
    """PaliGemma 3B at 224 px (`paligemma.full_size_config`: SigLIP-So400m + Gemma-2B, 256 image tokens) with the
    preset's offline tokenizer: special-token ids are the tokenizer's, sizes (the 257,152-token vocabulary
    included) the checkpoint's."""
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    tokenizer = family.tiny_tokenizer()
    config = family.full_size_config()
    config.image_token_id = tokenizer.image_token_id
    text = config.text_config
    text.pad_token_id, text.bos_token_id, text.eos_token_id = (tokenizer.pad_token_id, tokenizer.bos_token_id,
                                                               tokenizer.eos_token_id)
    model = PaliGemmaForConditionalGeneration(config)
    seq_length = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    processor = PaliGemmaProcessor(image_processor=family.image_processor(224, seq_length), tokenizer=tokenizer)
    return model, processor


def _smolvlm_full_size(family):
    """SmolVLM-256M (`smolvlm.full_size_config`: SigLIP base-patch16 at 512 px, pixel shuffle 4, SmolLM2-135M) with
    the preset's offline tokenizer: special-token ids are the tokenizer's, sizes (the 49,280-token vocabulary
    included) the checkpoint's; one 512-px tile (64 image tokens) per image, as captune loads SmolVLM."""
    from transformers import Idefics3ForConditionalGeneration, Idefics3Processor

    tokenizer = family.tiny_tokenizer()
    processor = Idefics3Processor(image_processor=family.image_processor(512), tokenizer=tokenizer, image_seq_len=64,
                                  chat_template=family.CHAT_TEMPLATE)
    config = family.full_size_config(image_token_id=processor.image_token_id)
    text = config.text_config
    text.pad_token_id, text.bos_token_id, text.eos_token_id = (tokenizer.pad_token_id, tokenizer.bos_token_id,
                                                               tokenizer.eos_token_id)
    return Idefics3ForConditionalGeneration(config), processor


def _blip2_full_size(name: str, preset: str, family):
    """BLIP-2 OPT-2.7B or Flan-T5-XL (`blip2.full_size_config`) with the preset's offline BPE: special-token ids
    are the tokenizer's, sizes the checkpoint's."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    tokenizer = family.preset_tokenizer(preset)
    config = family.full_size_config("t5" if name == "blip2-t5" else "opt")
    config.image_token_id = tokenizer.convert_tokens_to_ids(family.IMAGE_TOKEN)
    text = config.text_config
    text.pad_token_id, text.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    if name == "blip2-t5":
        text.eos_token_id, text.decoder_start_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    else:
        text.eos_token_id = tokenizer(family.END_OF_CAPTION, add_special_tokens=False)["input_ids"][-1]
    model = Blip2ForConditionalGeneration(config)
    # As blip2.tiny: transformers starts the query tokens at zero (identical queries); LAVIS draws N(0, 0.02).
    torch.nn.init.normal_(model.query_tokens, std=config.qformer_config.initializer_range)
    tokenizer.image_token = family.IMAGE_TOKEN
    processor = Blip2Processor(image_processor=family.image_processor(224), tokenizer=tokenizer,
                               num_query_tokens=config.num_query_tokens)
    return model, processor


def random_caption(rng: random.Random) -> str:
    """COCO-like length: 8-14 words (COCO averages about 10.5)."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14)))


def write_images(folder: Path, count: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[Path]:
    """Write `count` photo-like JPEGs (smooth colour fields plus noise, COCO's typical 640x480) and return paths."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        coarse = torch.randint(0, 256, (12, 16, 3), generator=generator, dtype=torch.uint8).numpy()
        image = Image.fromarray(coarse).resize(size, Image.BICUBIC).filter(ImageFilter.GaussianBlur(3))
        noise = torch.randint(0, 40, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        path = folder / f"image_{i:04d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def peak_rss_mib() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    """CPU model, core count, load and date, printed beside every figure."""
    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run_worker(script: Path, args: list[str], timeout: float | None = None) -> dict:
    """Run `script --worker ...` in a fresh interpreter (so ru_maxrss is its own) and parse its last stdout line."""
    command = [sys.executable, str(script), "--worker", *args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result
