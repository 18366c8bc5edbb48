"""Turn samples into model batches: the caption objective as the original BLIP trains it.

Training batch (`CaptionCollator`):
    input_ids   `[DEC] prompt caption [SEP] [PAD]...`: the tokenizer's first token ([CLS]) is replaced by the bos
                token [DEC], because `generate()` starts every caption with [DEC]; training on [CLS] would teach a
                context the decoder never sees at inference.
    labels      input_ids with padding and the prompt set to -100 (ignored by the loss). The model shifts labels
                internally, so position 0 (the bos) is never a target.
    padding     to the longest caption in the batch, never to a fixed 512; captions are truncated to `max_tokens`.
"""

from __future__ import annotations


import torch
from torch.utils.data import Dataset

from .records import CaptionSample, load_rgb

IGNORE_INDEX = -100


class CaptionPairs(Dataset):
    """Training items: every (image, caption) pair, as the original BLIP iterates its annotations."""

    def __init__(self, samples: list[CaptionSample]):
        self.samples = samples
        self.pairs = [(i, j) for i, s in enumerate(samples) for j in range(len(s.captions))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        i, j = self.pairs[index]
        sample = self.samples[i]
        return {"image": load_rgb(sample.image, sample.origin), "caption": sample.captions[j]}


class CaptionImages(Dataset):
    """Evaluation items: each image once, with its position so gathered predictions can be matched back."""

    def __init__(self, samples: list[CaptionSample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        return {"image": load_rgb(sample.image, sample.origin), "index": index}


def prompt_length(tokenizer, prompt: str) -> int:
    """Number of leading positions the prompt occupies: bos plus the prompt's tokens (no [SEP])."""
    if not prompt:
        return 1
    return len(tokenizer(prompt, add_special_tokens=True)["input_ids"]) - 1


class CaptionCollator:
    """Batch training pairs into `pixel_values`, `input_ids`, `attention_mask` and `labels`.

    Args:
        processor: a `BlipProcessor` (image processor + BLIP tokenizer).
        max_tokens: maximum caption length in tokens, special tokens and prompt included.
        prompt: text every caption starts with (e.g. "a picture of "); excluded from the loss.
    """

    def __init__(self, processor, max_tokens: int = 40, prompt: str = ""):
        self.processor = processor
        self.max_tokens = max_tokens
        self.prompt = prompt
        self.prompt_tokens = prompt_length(processor.tokenizer, prompt)
        if self.prompt_tokens >= max_tokens:
            raise ValueError(f"prompt {prompt!r} fills all {max_tokens} caption tokens: raise max_caption_tokens")

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        pixel_values = self.processor.image_processor([it["image"] for it in items], return_tensors="pt")["pixel_values"]
        batch = self.tokenize([it["caption"] for it in items])
        batch["pixel_values"] = pixel_values
        return batch

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        # Joined with one space whatever the prompt's trailing whitespace (YAML and shells strip it).
        text = [f"{self.prompt.strip()} {caption}" if self.prompt.strip() else caption for caption in captions]
        encoded = tokenizer(
            text, padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        input_ids = encoded["input_ids"]
        input_ids[:, 0] = tokenizer.bos_token_id
        labels = input_ids.masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
        labels[:, : self.prompt_tokens] = IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": encoded["attention_mask"], "labels": labels}


class ImageCollator:
    """Batch evaluation images into `pixel_values` plus their dataset indices."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        pixel_values = self.processor.image_processor([it["image"] for it in items], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "index": torch.tensor([it["index"] for it in items])}
