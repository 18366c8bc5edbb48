"""Caption generation shared by evaluation, the `caption` command, the server and the demo."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from PIL import Image

from .models import family_of


# What a run records in captune.json ("generation") and `Captioner`, `caption`, `eval` and `serve` take as defaults: the
# decoding validation used, so a saved model captions as it was scored. Sampling options are per-call choices.
RECORDED_OPTIONS = ("num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty", "no_repeat_ngram_size",
                    "length_penalty")


@dataclass(frozen=True)
class GenerationOptions:
    """How captions are decoded.

    Attributes:
        num_beams: 1 decodes greedily; more runs beam search (the BLIP paper used 3).
        max_new_tokens: caption length cap, in tokens after the prompt.
        min_new_tokens: caption length floor, in tokens after the prompt (the BLIP paper used 5).
        prompt: text the caption starts with (must match training); stripped from the returned captions.
        do_sample: nucleus sampling instead of greedy/beam search.
        top_p: nucleus mass when sampling.
        temperature: softmax temperature when sampling.
        top_k: when sampling, draw from the k likeliest tokens only (50, transformers' default; 0 = all tokens).
        num_return_sequences: captions per image (sampling; SCST draws several). Not a `Captioner` option: callers
            that expect one caption per image never see it.
        repetition_penalty: >1 discourages tokens already in the caption (CTRL's penalty; 1 = off).
        no_repeat_ngram_size: n > 0 forbids any token n-gram from occurring twice (3 stops "a hat on top of a hat
            on top of"; 0 = off).
        length_penalty: beam search scores a finished caption by log-probability / length**length_penalty: > 1
            favours longer captions, < 1 shorter ones (1 = transformers' default; unused with num_beams 1).
    """

    num_beams: int = 1
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    prompt: str = ""
    do_sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0
    top_k: int = 50
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0

    def __post_init__(self):
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1 or self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, "
                f"got min {self.min_new_tokens}, max {self.max_new_tokens}"
            )
        if self.top_k < 0 or self.num_return_sequences < 1:
            raise ValueError(f"need top_k >= 0 and num_return_sequences >= 1, got {self.top_k} and "
                             f"{self.num_return_sequences}")
        if self.repetition_penalty <= 0 or self.no_repeat_ngram_size < 0:
            raise ValueError(f"need repetition_penalty > 0 and no_repeat_ngram_size >= 0, got "
                             f"{self.repetition_penalty} and {self.no_repeat_ngram_size}")

    def generate_kwargs(self) -> dict:
        kwargs = asdict(self)
        kwargs.pop("prompt")
        if not self.do_sample:
            kwargs.pop("top_p")
            kwargs.pop("temperature")
            kwargs.pop("top_k")
        if self.num_beams == 1:
            kwargs.pop("length_penalty")  # a beam-search score; transformers warns when it is set for greedy
        return kwargs


def caption_pixels(model, processor, pixel_values: torch.Tensor, options: GenerationOptions) -> list[str]:
    """Caption a batch of preprocessed images with the model's family's decoding.

    Args:
        model: a loaded captioner (unwrapped, not a DDP wrapper).
        processor: its processor.
        pixel_values: (batch, 3, H, W) as the family's `pixel_values` returns them.
        options: decoding options.

    Returns:
        One caption per image (options.num_return_sequences per image, image by image, when sampling several),
        prompt removed, special tokens skipped.
    """
    return family_of(model).generate(model, processor, pixel_values, options)


def caption_images(model, processor, images: list[Image.Image], options: GenerationOptions, batch_size: int = 16) -> list[str]:
    """Caption PIL images (converted to RGB) in batches of `batch_size`."""
    family = family_of(model)
    captions: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = [image.convert("RGB") for image in images[start : start + batch_size]]
        captions.extend(family.generate(model, processor, family.pixel_values(processor, chunk), options))
    return captions
