"""Optional training transforms as the original BLIP applies them, in PIL (torchvision is not required).

BLIP's caption fine-tuning uses RandomResizedCrop(scale=(0.5, 1.0), bicubic), a horizontal flip, and RandAugment.
captune keeps the crop only: a flip turns "a dog left of a car" into a lie, and RandAugment's colour changes do the
same to "a red car". Captions go through `pre_caption` (lower case, no punctuation, at most max_words words).
"""

from __future__ import annotations

import math
import random
import re

from PIL import Image


def random_resized_crop(image: Image.Image, size: int, scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), rng: random.Random | None = None) -> Image.Image:
    """Crop a random area (`scale` of the image, aspect in `ratio`) and resize it to size x size, bicubic.

    The same sampling as torchvision's RandomResizedCrop: ten tries, then a centre crop at the nearest valid ratio.
    """
    rng = rng or random
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """BLIP's `pre_caption`: lower case, its punctuation set (. ! " ( ) * # : ; ~) out, spaces collapsed, at most
    `max_words` words. Commas and apostrophes stay, as in BLIP, so the text matches its published recipe."""
    caption = _PUNCTUATION.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if max_words and len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption
