"""Data sources, the sample type, and the split logic."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import CaptuneError
from .folder import find_splits, read_folder
from .records import CaptionSample, load_rgb

__all__ = ["CaptionSample", "DatasetSplits", "build_dataset", "load_rgb", "split_off"]


@dataclass
class DatasetSplits:
    train: list[CaptionSample]
    validation: list[CaptionSample]


def build_dataset(path: str | Path, val_split: float = 0.0, seed: int = 0) -> DatasetSplits:
    """Read the dataset at `path` into train and validation samples.

    Validation comes from the dataset's own validation folder when it has one; otherwise `val_split` (a fraction of
    the images, chosen with `seed`) is held out of training.

    Raises:
        CaptuneError: unreadable data, or `val_split` given although the data has its own validation split.
    """
    splits = find_splits(Path(path).expanduser())
    train = read_folder(splits["train"])
    validation = read_folder(splits["validation"]) if "validation" in splits else []
    if val_split:
        if validation:
            raise CaptuneError(
                f"--val-split {val_split} given but {splits['validation']} already holds the validation split: drop one"
            )
        train, validation = split_off(train, val_split, seed)
    return DatasetSplits(train=train, validation=validation)


def split_off(samples: list[CaptionSample], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of the images (not of the captions), reproducibly for a given seed."""
    if not 0 < fraction < 1:
        raise CaptuneError(f"--val-split must be between 0 and 1 (exclusive), got {fraction}")
    order = sorted(range(len(samples)), key=lambda i: samples[i].id)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(samples) * fraction))
    if n_val >= len(samples):
        raise CaptuneError(f"--val-split {fraction} leaves no training images out of {len(samples)}")
    held = set(order[:n_val])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]
