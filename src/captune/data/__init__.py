"""Data sources, the sample type, and the split logic.

`build_dataset` picks one small reader per format with a plain if/elif; every reader yields `CaptionSample`s
(webdataset shards are streamed instead, see wds.py).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CaptuneError
from .collate import CaptionPairs, ItemOptions
from .folder import find_splits, has_sidecars, read_folder, read_sidecar_folder
from .records import CaptionSample, Problem, load_rgb

if TYPE_CHECKING:
    from .wds import ShardCounts

__all__ = ["CaptionSample", "DatasetSplits", "FORMATS", "Problem", "Shards", "build_dataset", "load_rgb", "sniff",
           "split_off", "training_dataset"]

FORMATS = ("auto", "folder", "sidecar", "coco", "karpathy", "hf", "webdataset")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Shards:
    """Training tar shards, streamed rather than listed; sizes counted once from the caption members."""

    paths: list[Path]
    counts: "ShardCounts"

    @property
    def images(self) -> int:
        return self.counts.images

    @property
    def pairs(self) -> int:
        return self.counts.pairs

    def __len__(self) -> int:
        return self.images


@dataclass
class DatasetSplits:
    train: list[CaptionSample] | Shards
    validation: list[CaptionSample]
    test: list[CaptionSample] = field(default_factory=list)
    """Only Karpathy files name a test split; kept apart, never trained or validated on."""
    problems: list[Problem] = field(default_factory=list)
    """Bad rows skipped while reading (only when read with strict=False)."""
    format: str = "folder"


def sniff(path: str) -> str:
    """Tell the format of `path` from what is there (see FORMATS).

    Raises:
        CaptuneError: the path does not exist, or holds nothing captune reads.
    """
    from . import coco, hf, wds

    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix.lower() == ".json":
            return "karpathy" if coco.is_karpathy(coco.load_json(local)) else "coco"
        if wds.is_shard_path(path):
            return "webdataset"
        raise CaptuneError(f"--data {path}: a file must be a COCO/Karpathy .json or a .tar shard; for an image "
                           "folder pass its directory")
    if local.is_dir():
        if hf.is_saved_dataset(local):
            return "hf"
        if any((d / m).is_file() for d in (local, local / "train") for m in ("metadata.jsonl", "metadata.csv")):
            return "folder"
        if wds.is_shard_path(path):
            return "webdataset"
        if has_sidecars(local) or ((local / "train").is_dir() and has_sidecars(local / "train")):
            return "sidecar"
        raise CaptuneError(
            f"cannot tell what {path} holds: no metadata.jsonl or metadata.csv, no images with .txt captions, no .tar "
            "shards, no save_to_disk dataset (nor train/ and validation/ folders of those); --data-format forces one"
        )
    if any(c in path for c in "*?["):
        return "webdataset"
    if _HUB_ID.match(path) and not path.startswith("."):
        return "hf"
    raise CaptuneError(f"data directory {path} does not exist: check --data")


def build_dataset(path: str | Path, val_split: float = 0.0, seed: int = 0, *, data_format: str = "auto",
                  image_root: str = "", image_column: str = "", caption_column: str = "", train_split: str = "train",
                  eval_split: str = "", strict: bool = True, require_train: bool = True) -> DatasetSplits:
    """Read the dataset at `path` into train and validation samples.

    Validation comes from the dataset's own validation split when it has one; otherwise `val_split` (a fraction of
    the images, chosen with `seed`) is held out of training.

    Args:
        data_format: one of FORMATS; "auto" sniffs the path.
        image_root: where COCO/Karpathy file names are relative to (default: the JSON's folder).
        image_column, caption_column, train_split, eval_split: for Hugging Face datasets (empty = detect).
        strict: raise on the first bad row (missing image, empty caption...); False collects them in `problems`
            and skips them (an empty split too), as training with on_bad_sample=skip, eval and `captune check` do.
        require_train: raise when no training sample is left (False: `check` and `eval`, which report it).

    Raises:
        CaptuneError: unreadable data, or `val_split` given although the data has its own validation split.
    """
    from . import coco, hf, wds

    path = str(path)
    fmt = sniff(path) if data_format == "auto" else data_format
    problems: list[Problem] | None = None if strict else []
    root = Path(image_root).expanduser() if image_root else None
    test: list[CaptionSample] = []
    if fmt == "folder" or fmt == "sidecar":
        splits = find_splits(Path(path).expanduser(), fmt)
        read = read_folder if fmt == "folder" else read_sidecar_folder
        train = read(splits["train"], problems)
        validation = read(splits["validation"], problems) if "validation" in splits else []
    elif fmt == "coco":
        train, validation = coco.read_coco(Path(path).expanduser(), root, problems), []
    elif fmt == "karpathy":
        found = coco.read_karpathy(Path(path).expanduser(), root, problems)
        train, validation, test = found["train"], found["validation"], found["test"]
    elif fmt == "hf":
        found = hf.read_hf(path, image_column=image_column, caption_column=caption_column, train_split=train_split,
                           eval_split=eval_split, problems=problems)
        train, validation = found["train"], found["validation"]
    elif fmt == "webdataset":
        shards = wds.find_shards(path)
        counts = wds.count_samples(shards["train"])
        if not counts.images:
            raise CaptuneError(f"no usable samples (image + .txt/.json caption) in the shards at {path}")
        train = Shards(shards["train"], counts)
        validation, found_problems = wds.read_all(shards["validation"]) if "validation" in shards else ([], [])
        if found_problems and problems is None:
            raise CaptuneError(str(found_problems[0]))
        problems = problems + found_problems if problems is not None else None
        if val_split:
            raise CaptuneError("--val-split cannot hold out streamed shards: put validation shards in "
                               f"{path}/validation/")
    else:
        raise CaptuneError(f"unknown data format {fmt!r}: use one of {', '.join(FORMATS)}")
    if require_train and not train:
        found = problems or []
        listed = "; ".join(str(p) for p in found[:3]) + ("; ..." if len(found) > 3 else "")
        raise CaptuneError(f"{path}: the dataset is empty: no usable training sample ({len(found)} problem(s): {listed}): "
                           f"`captune check {path}` lists them all")
    if val_split:
        if validation:
            raise CaptuneError(f"--val-split {val_split} given but {path} already has a validation split: drop one")
        train, validation = split_off(train, val_split, seed)
    return DatasetSplits(train=train, validation=validation, test=test, problems=problems or [], format=fmt)


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


def training_dataset(train: list[CaptionSample] | Shards, *, caption_sampling: str = "all",
                     options: ItemOptions | None = None, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                     seed: int = 0):
    """The torch dataset of training items: map-style over a list, an IterableDataset over shards.

    `rank`, `world_size` and `num_workers` matter for shards only: the stream splits itself across processes and
    workers, so the caller must not let Accelerate shard it again. `seed` (with the epoch and the item) seeds every
    random draw of an item: caption choice, crop, a stream's shuffle.
    """
    if isinstance(train, Shards):
        from .wds import ShardStream

        return ShardStream(train.paths, train.counts, caption_sampling=caption_sampling, options=options, rank=rank,
                           world_size=world_size, num_workers=num_workers, seed=seed)
    return CaptionPairs(train, caption_sampling, options, seed=seed)


def count_captions(train: list[CaptionSample] | Shards) -> int:
    return train.pairs if isinstance(train, Shards) else sum(len(s.captions) for s in train)
