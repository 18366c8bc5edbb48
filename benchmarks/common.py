"""Shared pieces of the benchmarks: the full-size BLIP-base architecture, generated JPEGs, worker subprocesses.

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
