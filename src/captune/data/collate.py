"""Turn samples into model batches.

The model's family (`captune.models`) turns images into `pixel_values` and captions into `input_ids`,
`attention_mask` and `labels` (-100 at padding, prompt and image placeholder tokens; the first token is the one
generation starts from); this module decodes the items, drops bad ones, and shares images between captions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import CaptuneError
from ..models import family_module, family_of_processor
from ..models.common import IGNORE_INDEX
from ..seeding import item_rng
from .records import DEFAULT_MAX_PIXELS, CaptionSample, load_rgb
from .transforms import pre_caption, random_resized_crop

@dataclass(frozen=True)
class ItemOptions:
    """How a training item is decoded and transformed (picklable: it travels to the DataLoader workers)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    """Refuse larger images (decompression bombs)."""
    draft_size: int = 0
    """Decode JPEGs at the smallest DCT scale still at least this size (the processor's image size); 0 = full."""
    augment_size: int = 0
    """RandomResizedCrop to this size (scale 0.5-1, bicubic) as BLIP trains; 0 = no augmentation."""
    normalize_captions: bool = False
    """Apply BLIP's pre_caption to training captions."""
    max_words: int = 30
    """Word cap of pre_caption."""


def decode_image(sample: CaptionSample, options: ItemOptions, rng: random.Random | None = None) -> Image.Image | dict:
    """The sample's training image (augmented with `rng`'s draws when asked), or a `skip` record naming the sample
    and the reason.

    A bad sample never raises here: in a worker process the exception would reach the user as a traceback, and
    the run would die mid-epoch. The collator drops skips and hands them to the training loop, which decides.
    """
    try:
        image = load_rgb(sample.image, sample.origin or sample.id, max_pixels=options.max_pixels,
                         draft_size=options.draft_size)
    except CaptuneError as exc:
        return {"skip": {"id": sample.id, "reason": str(exc)}}
    except Exception as exc:  # a decoder bug on hostile input must cost one sample, not the run
        return {"skip": {"id": sample.id, "reason": f"{sample.origin or sample.id}: cannot decode image ({exc!r})"}}
    if options.augment_size:
        image = random_resized_crop(image, options.augment_size, rng=rng)
    return image


def training_item(sample: CaptionSample, caption: str, options: ItemOptions, image=None,
                  rng: random.Random | None = None) -> dict:
    """One (image, caption) training item, or a `skip` record; `image` is an already decoded one (or its skip)."""
    image = decode_image(sample, options, rng) if image is None else image
    if isinstance(image, dict):
        return image
    if options.normalize_captions:
        caption = pre_caption(caption, options.max_words)
        if not caption:
            return {"skip": {"id": sample.id, "reason": f"{sample.origin or sample.id}: caption empty after "
                                                          "normalisation"}}
    return {"image": image, "caption": caption}


class LastImage:
    """Remembers the last decoded image: grouped sampling asks for an image's captions one after another.

    All captions of an image share one decode, hence one crop (their rows share one ViT pass): `rng` must be a
    function of the image and the epoch, and the cache is keyed by both, so a worker never carries a crop over into
    the next epoch.
    """

    def __init__(self):
        self.key, self.image = None, None

    def item(self, key, sample: CaptionSample, caption: str, options: ItemOptions, rng: random.Random | None = None,
             epoch: int = 0) -> dict:
        if (epoch, key) != self.key:
            self.key, self.image = (epoch, key), decode_image(sample, options, rng)
        item = training_item(sample, caption, options, image=self.image)
        return {**item, "key": key} if "image" in item else item


class CaptionPairs(Dataset):
    """Training items from a list of samples.

    Indexed by `(epoch, index)` keys, as `checkpoint.EpochSampler` yields them (a plain index means epoch 0). Every
    random draw of an item (its caption under "random", its crop under augmentation) comes from `seed`, the
    epoch and the item's index (`seeding.item_rng`), never from the worker's RNG: which worker builds a batch, and
    how that worker was seeded, changes when a run resumes mid-epoch, and must not change the batch.

    Args:
        caption_sampling: "all" = every (image, caption) pair each epoch, as the original BLIP iterates its
            annotations; "random" = each image once per epoch with one of its captions drawn at random; "grouped" =
            every pair, and `groups()` tells the sampler which pairs share an image so it keeps them together.
        seed: the run's seed.
    """

    def __init__(self, samples: list[CaptionSample], caption_sampling: str = "all", options: ItemOptions | None = None,
                 seed: int = 0):
        self.samples = samples
        self.caption_sampling = caption_sampling
        self.options = options or ItemOptions()
        self.seed = seed
        if caption_sampling in ("all", "grouped"):
            self.pairs = [(i, j) for i, s in enumerate(samples) for j in range(len(s.captions))]
        else:
            self.pairs = [(i, None) for i in range(len(samples))]
        self.last = LastImage()

    def __len__(self) -> int:
        return len(self.pairs)

    def groups(self) -> list[int] | None:
        """For "grouped": the number of consecutive pairs each image has (pairs are listed image by image)."""
        return [len(s.captions) for s in self.samples] if self.caption_sampling == "grouped" else None

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        i, j = self.pairs[index]
        sample = self.samples[i]
        if j is None:
            caption = item_rng(self.seed, epoch, "caption", i).choice(sample.captions)
        else:
            caption = sample.captions[j]
        if self.caption_sampling == "grouped":
            # One crop per image and epoch: its captions share the decoded image (see LastImage).
            return self.last.item(i, sample, caption, self.options, item_rng(self.seed, epoch, "crop", "image", i), epoch)
        return training_item(sample, caption, self.options, rng=item_rng(self.seed, epoch, "crop", index))


class CaptionImages(Dataset):
    """Evaluation items: each image once, with its position so gathered predictions can be matched back."""

    def __init__(self, samples: list[CaptionSample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            return {"image": load_rgb(sample.image, sample.origin), "index": index}
        except CaptuneError as exc:
            # One unreadable held-out image must not end a run at its first validation: it is reported and left
            # out of the scores instead (see evaluate.predict).
            return {"image": None, "index": index, "problem": str(exc)}
        except Exception as exc:  # a decoder error PIL does not wrap (bad EXIF, a null dataset cell...)
            return {"image": None, "index": index,
                    "problem": f"{sample.origin or sample.id}: cannot decode image ({exc!r})"}


class CaptionCollator:
    """Batch training pairs into `pixel_values`, `input_ids`, `attention_mask` and `labels`.

    Args:
        processor: the model's processor (image processor + tokenizer).
        max_tokens: maximum caption length in tokens, special tokens and prompt included.
        prompt: text every caption starts with (e.g. "a picture of "); excluded from the loss.
        family: the model's family module (`captune.models.family_of(model)`); default: told from the processor.
    """

    def __init__(self, processor, max_tokens: int = 40, prompt: str = "", family=None):
        self.processor = processor
        self.max_tokens = max_tokens
        self.prompt = prompt
        # The family's name, not its module: collators travel to DataLoader workers, and modules do not pickle.
        self.family_name = (family or family_of_processor(processor)).NAME
        self.tokenize([""])  # a prompt that leaves no room for a caption fails here, not in a worker

    @property
    def family(self):
        return family_module(self.family_name)

    def __call__(self, items: list[dict]) -> dict:
        """Batch the good items; `skipped` lists the bad ones ({id, reason}) so the main process can count them
        (a counter inside a worker process would be lost); `pairs` counts the good ones.

        A batch with no good item (all bad, or only the padding a stream adds to even out processes) is still a
        batch: one grey image whose labels are all ignored, so it trains nothing but every process still runs the
        step's forward, backward and gradient all-reduce (skipping it on one process would deadlock the others).
        """
        skipped = [it["skip"] for it in items if "skip" in it]
        items = [it for it in items if "skip" not in it and "pad" not in it]
        if items:
            images, captions = [it["image"] for it in items], [it["caption"] for it in items]
        else:
            images, captions = [blank_image(self.processor, self.family)], [""]
        keys = [it.get("key") for it in items]
        shared = None not in keys and len(set(keys)) < len(keys)
        if shared:
            # Grouped sampling: each image once, and `image_index` maps caption rows to it (see speed.share_images).
            first = {}
            index = [first.setdefault(key, len(first)) for key in keys]
            images = [items[keys.index(key)]["image"] for key in first]
        pixel_values = self.family.pixel_values(self.processor, images)
        batch = self.tokenize(captions)
        if not items:
            batch["labels"].fill_(IGNORE_INDEX)
        batch["pixel_values"] = pixel_values
        if shared:
            batch["image_index"] = torch.tensor(index)
        batch["pairs"] = len(items)
        if skipped:
            batch["skipped"] = skipped
        return batch

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self.family.tokenize(self.processor, captions, prompt=self.prompt, max_tokens=self.max_tokens)


def blank_image(processor, family=None) -> Image.Image:
    """A mid-grey image of the processor's input size: the stand-in wherever a batch must not be empty."""
    side = (family or family_of_processor(processor)).image_size(processor)
    return Image.new("RGB", (side, side), (128, 128, 128))


class ImageCollator:
    """Batch evaluation images into `pixel_values` plus their dataset indices."""

    def __init__(self, processor, family=None):
        self.processor = processor
        self.family_name = (family or family_of_processor(processor)).NAME

    @property
    def family(self):
        return family_module(self.family_name)

    def __call__(self, items: list[dict]) -> dict:
        # A grey stand-in keeps the batch whole for an unreadable image; its caption is discarded.
        blank = blank_image(self.processor, self.family)
        images = [it["image"] if it["image"] is not None else blank for it in items]
        pixel_values = self.family.pixel_values(self.processor, images)
        return {"pixel_values": pixel_values, "index": torch.tensor([it["index"] for it in items]),
                "problems": [it.get("problem") for it in items]}
