"""Read a Hugging Face imagefolder: images beside `metadata.jsonl` or `metadata.csv`.

Layouts accepted (the `datasets` imagefolder convention):
    DIR/metadata.jsonl                       everything is training data
    DIR/train/metadata.jsonl                 plus DIR/validation/ (or val/, test/) for held-out data
Each row has `file_name` and a caption column, `text` or `caption`. A caption may be a list, and a file may appear on
several rows: all its captions are kept.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import CaptuneError
from .records import CaptionSample

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption", "captions")
VALIDATION_DIRS = ("validation", "val", "test")


def find_splits(root: Path) -> dict[str, Path]:
    """Map split name ("train", "validation") to the folder that holds its metadata."""
    if not root.exists():
        raise CaptuneError(f"data directory {root} does not exist: check --data")
    if not root.is_dir():
        raise CaptuneError(f"--data {root} is not a directory: pass an image folder with metadata.jsonl or metadata.csv")
    if _metadata_file(root):
        return {"train": root}
    splits = {}
    if (root / "train").is_dir() and _metadata_file(root / "train"):
        splits["train"] = root / "train"
    for name in VALIDATION_DIRS:
        if (root / name).is_dir() and _metadata_file(root / name):
            splits["validation"] = root / name
            break
    if "train" not in splits:
        raise CaptuneError(
            f"no metadata.jsonl or metadata.csv in {root} (or in {root}/train): an image folder needs one, with "
            "columns file_name and text (or caption); see README 'Your data'"
        )
    return splits


def _metadata_file(folder: Path) -> Path | None:
    for name in METADATA_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def read_folder(folder: Path) -> list[CaptionSample]:
    """Read one split folder into samples, grouping every caption of an image.

    Raises:
        CaptuneError: malformed metadata (with file and line), missing caption column, missing images, no rows.
    """
    metadata = _metadata_file(folder)
    if metadata is None:
        raise CaptuneError(f"no metadata.jsonl or metadata.csv in {folder}")
    rows = _read_jsonl(metadata) if metadata.suffix == ".jsonl" else _read_csv(metadata)
    root = folder.resolve()
    grouped: dict[str, list[str]] = {}
    origins: dict[str, str] = {}
    for line, row in rows:
        where = f"{metadata}:{line}"
        if "file_name" not in row:
            raise CaptuneError(f"{where}: no file_name column (found: {', '.join(sorted(row)) or 'none'})")
        column = next((c for c in CAPTION_COLUMNS if c in row), None)
        if column is None:
            raise CaptuneError(
                f"{where}: no caption column; expected one of {', '.join(CAPTION_COLUMNS)} (found: {', '.join(sorted(row))})"
            )
        value = row[column]
        captions = [value] if isinstance(value, str) else list(value or [])
        captions = [str(c).strip() for c in captions if str(c).strip()]
        if not captions:
            raise CaptuneError(f"{where}: empty caption for {row['file_name']}")
        name = str(row["file_name"])
        path = (folder / name).resolve()
        if not path.is_relative_to(root):
            raise CaptuneError(f"{where}: file_name {name!r} points outside the dataset folder {folder}")
        if not path.is_file():
            raise CaptuneError(f"{where}: image {name} not found in {folder}")
        grouped.setdefault(name, []).extend(captions)
        origins.setdefault(name, where)
    if not grouped:
        raise CaptuneError(f"{metadata} has no rows: the dataset is empty")
    return [
        CaptionSample(id=name, captions=tuple(caps), image=folder / name, origin=origins[name])
        for name, caps in grouped.items()
    ]


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8-sig") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise CaptuneError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise CaptuneError(f"{path}:{number}: expected a JSON object per line")
            yield number, row


def _read_csv(path: Path):
    with open(path, encoding="utf-8-sig", newline="") as handle:
        # Row numbers count the header as line 1, as a spreadsheet shows them.
        for number, row in enumerate(csv.DictReader(handle), start=2):
            yield number, {k: v for k, v in row.items() if k is not None}
