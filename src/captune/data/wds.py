"""Stream webdataset tar shards: `key.jpg` (or .png, .webp...) next to `key.txt` or `key.json`.

Read with the standard `tarfile` module rather than the `webdataset` package: no extra dependency, and the split we
need is 20 lines. webdataset splits by shard (`split_by_node`, `split_by_worker`), which with fewer shards than
ranks x workers gives some consumers nothing, and with uneven shards needs `with_epoch` resampling, which repeats
or drops samples. Here every consumer (rank r of R, worker w of W) takes the samples whose position n in the stream
has n % (R*W) == r*W + w: each sample exactly once per epoch, counts balanced to within one, whatever the shards.
Each consumer scans every tar header (512 bytes a member; image bytes of other consumers' samples are skipped with a
seek), which is cheap for local shards.

Several processes must also run the same number of steps, or the one with more batches waits forever in a collective
at the epoch end. So every consumer yields exactly as many items as the busiest one (`ShardCounts` knows each
position's item count from the caption members, read once): the others top up with `{"pad": True}` items, which the
collator drops (a batch of only pads becomes a zero-loss placeholder batch). The shuffle buffer and caption draws are
seeded from (seed, epoch, consumer) and a crop from (seed, epoch, sample, caption), so an epoch's items are the same
when a run resumes in the middle of it.

Layouts: a .tar file, a directory of .tar files, a directory with train/ and validation/ (or val/, test/) folders of
.tar files, or a glob (`shards/*.tar`).
"""

from __future__ import annotations

import glob
import json
import random
import tarfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from torch.utils.data import IterableDataset, get_worker_info

from ..errors import CaptuneError
from ..seeding import item_rng
from .collate import ItemOptions, LastImage, training_item
from .folder import IMAGE_SUFFIXES, VALIDATION_DIRS, clean_captions
from .records import CaptionSample, Problem

CAPTION_KEYS = ("caption", "text", "captions", "txt")


def is_shard_path(path: str) -> bool:
    """True for a .tar file, a glob of them, or a directory (or its train/) holding .tar files."""
    local = Path(path).expanduser()
    if any(c in path for c in "*?[") or local.suffix == ".tar" or path.endswith((".tar.gz", ".tgz")):
        return True
    return local.is_dir() and (any(local.glob("*.tar")) or any((local / "train").glob("*.tar")))


def find_shards(path: str) -> dict[str, list[Path]]:
    """Map split name to its sorted shard files.

    Raises:
        CaptuneError: nothing matches.
    """
    local = Path(path).expanduser()
    if any(c in path for c in "*?["):
        splits = {"train": [Path(p) for p in sorted(glob.glob(str(local)))]}
    elif local.is_file():
        splits = {"train": [local]}
    elif local.is_dir() and any(local.glob("*.tar")):
        splits = {"train": sorted(local.glob("*.tar"))}
    else:
        splits = {"train": sorted((local / "train").glob("*.tar"))}
        held = next((local / n for n in VALIDATION_DIRS if any((local / n).glob("*.tar"))), None)
        if held is not None:
            splits["validation"] = sorted(held.glob("*.tar"))
    if not splits["train"]:
        raise CaptuneError(f"no .tar shards at {path}: pass a .tar file, a folder of them, or a glob like 'dir/*.tar'")
    return splits


def _members(path: Path) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], tarfile.TarFile]]:
    """Group consecutive members by key (path up to the first dot of the base name), as webdataset does."""
    try:
        with tarfile.open(path, "r:*") as tar:
            key, group = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, _, ext = base.partition(".")
                name = f"{folder}/{stem}" if folder else stem
                if name != key and group:
                    yield key, group, tar
                    group = {}
                key = name
                group[ext.lower()] = member
            if group:
                yield key, group, tar
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CaptuneError(f"{path}: unreadable tar shard ({exc})") from exc


def iter_samples(shards: list[Path], keep=None) -> Iterator[CaptionSample | Problem | None]:
    """Every sample of `shards` in order; a Problem for a broken one; None for ones `keep(n)` turns down.

    `keep(n)` is asked before any image bytes are read, with n the sample's position across all shards.
    """
    n = 0
    for shard in shards:
        for key, group, tar in _members(shard):
            position, n = n, n + 1
            if keep is not None and not keep(position):
                yield None
                continue
            where = f"{shard}:{key}"
            image_ext = next((e for e in group if f".{e}" in IMAGE_SUFFIXES), None)
            if image_ext is None:
                yield Problem(where, f"no image member (has: {', '.join(sorted(group))})", key)
                continue
            captions = _captions(tar, group, where)
            if isinstance(captions, Problem):
                yield captions
                continue
            data = tar.extractfile(group[image_ext]).read()
            yield CaptionSample(id=key, captions=tuple(captions), image=data, origin=f"{where}.{image_ext}")


def _captions(tar, group, where) -> list[str] | Problem:
    key = where.rpartition(":")[2]
    if "txt" in group:
        raw = tar.extractfile(group["txt"]).read()
        try:
            captions = clean_captions(raw.decode("utf-8-sig").splitlines())
        except UnicodeDecodeError as exc:
            return Problem(f"{where}.txt", f"not UTF-8 ({exc.reason} at byte {exc.start})", key)
    elif "json" in group:
        try:
            value = json.loads(tar.extractfile(group["json"]).read().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return Problem(f"{where}.json", f"not valid UTF-8 JSON ({exc})", key)
        field = next((k for k in CAPTION_KEYS if isinstance(value, dict) and k in value), None)
        try:
            captions = clean_captions(value[field]) if field else []
        except ValueError as exc:
            return Problem(f"{where}.json", str(exc), key)
    else:
        return Problem(where, f"no caption member .txt or .json (has: {', '.join(sorted(group))})", key)
    return captions or Problem(where, "empty caption", key)


@dataclass
class ShardCounts:
    """What the shards hold, counted once from the caption members (no image bytes read)."""

    images: int
    """Samples with an image and a usable caption."""
    pairs: int
    """Image-caption pairs over those samples."""
    captions: array
    """Per stream position (every key group, broken ones too): its caption count, 0 for a broken sample."""

    def items(self, caption_sampling: str, consumers: int) -> list[int]:
        """Training items each of `consumers` readers yields (before padding): a broken sample is one skip item."""
        counts = [0] * consumers
        for n, captions in enumerate(self.captions):
            counts[n % consumers] += captions if caption_sampling != "random" and captions else 1
        return counts


def count_samples(shards: list[Path]) -> ShardCounts:
    """Count images, pairs and each stream position's captions, reading caption members only."""
    images = pairs = 0
    per_position = array("I")
    for shard in shards:
        for key, group, tar in _members(shard):
            captions = _captions(tar, group, f"{shard}:{key}")
            if not any(f".{e}" in IMAGE_SUFFIXES for e in group) or isinstance(captions, Problem):
                per_position.append(0)
                continue
            per_position.append(len(captions))
            images, pairs = images + 1, pairs + len(captions)
    return ShardCounts(images, pairs, per_position)


def read_all(shards: list[Path]) -> tuple[list[CaptionSample], list[Problem]]:
    """Load every sample into memory (for validation shards, which are small)."""
    samples, problems = [], []
    for item in iter_samples(shards):
        (problems if isinstance(item, Problem) else samples).append(item)
    return samples, problems


class ShardStream(IterableDataset):
    """Training items streamed from tar shards, split exactly across processes and DataLoader workers.

    Args:
        shards: the tar files, in a fixed order (the same on every rank).
        counts: what `count_samples` found in them.
        rank, world_size: this process's place among the training processes.
        num_workers: DataLoader workers per process (0 = the main process reads).
        seed: with the epoch (`set_epoch`) and the consumer, seeds the shuffle buffer and caption draws.
        shuffle_buffer: items held and drawn at random from (0 = stream order).
    """

    def __init__(self, shards: list[Path], counts: ShardCounts, *, caption_sampling: str = "all",
                 options: ItemOptions | None = None, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 seed: int = 0, shuffle_buffer: int = 256):
        self.shards, self.counts = list(shards), counts
        self.caption_sampling, self.options = caption_sampling, options or ItemOptions()
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.seed, self.epoch, self.shuffle_buffer = seed, 0, shuffle_buffer
        # Every consumer yields this many items, padding included, so every rank has the same number of batches.
        self.per_consumer = max(counts.items(caption_sampling, world_size * self.workers))

    def __len__(self) -> int:
        """Items this process yields per epoch, padding included (exact)."""
        return self.per_consumer * self.workers

    def batches(self, batch_size: int) -> int:
        """Batches this process gets per epoch: each worker ends its share with one partial batch."""
        return self.workers * -(-self.per_consumer // batch_size)

    def set_epoch(self, epoch: int) -> None:
        # Workers are not persistent for streams (train.py), so they are re-created with this value every epoch.
        self.epoch = epoch

    def __iter__(self):
        info = get_worker_info()
        if (info.num_workers if info is not None else 1) != self.workers:
            # Consumers would overlap (or leave samples out): the split assumes the worker count it was built with.
            raise ValueError(f"ShardStream built for {self.workers} worker(s) is read by "
                             f"{info.num_workers if info else 0}: pass num_workers to training_dataset")
        worker = info.id if info is not None else 0
        consumers, me = self.world_size * self.workers, self.rank * self.workers + worker
        rng = random.Random(f"captune-stream {self.seed} {self.epoch} {me}")
        last = LastImage()
        buffer: list = []
        produced = 0
        for item in iter_samples(self.shards, keep=lambda n: n % consumers == me):
            if item is None:
                continue
            # Buffered encoded (bytes), decoded only when yielded: 256 decoded images would hold ~100 MB a worker.
            # A unit is one pair, or (grouped) all of an image's pairs, which then stay next to each other.
            for unit in self._units(item, rng):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(unit)
                    continue
                index = rng.randrange(len(buffer))
                buffer[index], unit = unit, buffer[index]
                for pair in unit:
                    produced += 1
                    yield self._decode(pair, last)
        rng.shuffle(buffer)
        for unit in buffer:
            for pair in unit:
                produced += 1
                yield self._decode(pair, last)
        for _ in range(self.per_consumer - produced):
            yield {"pad": True}

    def _units(self, item, rng) -> list[list]:
        """Pairs (sample, caption, caption index), grouped into the units the shuffle buffer moves."""
        if isinstance(item, Problem):
            return [[item]]
        if self.caption_sampling == "random":
            j = rng.randrange(len(item.captions))
            return [[(item, item.captions[j], j)]]
        pairs = [(item, caption, j) for j, caption in enumerate(item.captions)]
        return [pairs] if self.caption_sampling == "grouped" else [[pair] for pair in pairs]

    def _decode(self, pair, last: LastImage) -> dict:
        if isinstance(pair, Problem):
            return {"skip": {"id": pair.id or pair.where, "reason": str(pair)}}
        sample, caption, j = pair
        if self.caption_sampling == "grouped":  # one crop per image and epoch (see LastImage)
            return last.item(sample.origin, sample, caption, self.options,
                             item_rng(self.seed, self.epoch, "crop", sample.origin), self.epoch)
        return training_item(sample, caption, self.options, rng=item_rng(self.seed, self.epoch, "crop", sample.origin, j))
