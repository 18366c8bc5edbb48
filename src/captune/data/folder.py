"""Read image folders: a Hugging Face imagefolder (metadata.jsonl / metadata.csv) or images with sidecar captions.

Layouts accepted:
    DIR/metadata.jsonl                       everything is training data (imagefolder)
    DIR/train/metadata.jsonl                 plus DIR/validation/ (or val/, test/) for held-out data
    DIR/cat.jpg + DIR/cat.txt                sidecar captions, one caption a line (same train/ validation/ split)
Each metadata row has `file_name` and a caption column, `text` or `caption`. A caption may be a list, and a file may
appear on several rows: all its captions are kept.

Readers take `problems`: None reads strictly (the first bad row raises), a list collects one `Problem` per bad row
and skips the row, so training can go on and `captune check` can list everything at once.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import CaptuneError
from .records import CaptionSample, Problem, report

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption", "captions")
VALIDATION_DIRS = ("validation", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def find_splits(root: Path, layout: str = "folder") -> dict[str, Path]:
    """Map split name ("train", "validation") to the folder that holds it.

    Args:
        layout: "folder" (needs metadata.jsonl/csv) or "sidecar" (needs images with .txt captions).
    """
    if not root.exists():
        raise CaptuneError(f"data directory {root} does not exist: check --data")
    if not root.is_dir():
        raise CaptuneError(f"--data {root} is not a directory: pass an image folder with metadata.jsonl or metadata.csv")
    holds = _metadata_file if layout == "folder" else has_sidecars
    if holds(root):
        return {"train": root}
    splits = {}
    if (root / "train").is_dir() and holds(root / "train"):
        splits["train"] = root / "train"
    for name in VALIDATION_DIRS:
        if (root / name).is_dir() and holds(root / name):
            splits["validation"] = root / name
            break
    if "train" not in splits:
        if layout == "sidecar":
            raise CaptuneError(f"no images with .txt caption files in {root} (or in {root}/train)")
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


def has_sidecars(folder: Path) -> bool:
    """True when some image in `folder` has a caption file beside it (cat.jpg + cat.txt)."""
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file() for p in folder.iterdir())


def inside(root: Path, name: str) -> Path | None:
    """`root/name` resolved (symlinks followed), or None when it escapes `root` (`../`, absolute, symlink out)."""
    path = (root / name).resolve()
    return path if path.is_relative_to(root.resolve()) else None


def read_folder(folder: Path, problems: list[Problem] | None = None) -> list[CaptionSample]:
    """Read one imagefolder split into samples, grouping every caption of an image.

    Args:
        problems: None = raise on the first bad row; a list = append a Problem per bad row and skip it.

    Raises:
        CaptuneError: no metadata, a missing file_name/caption column, no usable rows; in strict mode any bad row.
    """
    metadata = _metadata_file(folder)
    if metadata is None:
        raise CaptuneError(f"no metadata.jsonl or metadata.csv in {folder}")
    rows = _read_jsonl(metadata, problems) if metadata.suffix == ".jsonl" else _read_csv(metadata, problems)
    grouped: dict[str, list[str]] = {}
    origins: dict[str, str] = {}
    n_rows = 0
    for line, row in rows:
        n_rows += 1
        where = f"{metadata}:{line}"
        # Each bad row is one problem, listed with the others; none of them hides the rest of the file.
        if "file_name" not in row:
            report(problems, Problem(where, f"no file_name column (found: {', '.join(sorted(row)) or 'none'})"))
            continue
        column = next((c for c in CAPTION_COLUMNS if c in row), None)
        name = str(row["file_name"])
        if column is None:
            report(problems, Problem(where, f"no caption column; expected one of {', '.join(CAPTION_COLUMNS)} (found: "
                                     f"{', '.join(sorted(row))})", name))
            continue
        if "\0" in name:
            report(problems, Problem(where, f"file_name {name!r} contains a NUL byte", name.replace("\0", "\\0")))
            continue
        try:
            captions = clean_captions(row[column])
        except ValueError as exc:
            report(problems, Problem(where, f"{exc} for {name}", name))
            continue
        if not captions:
            report(problems, Problem(where, f"empty caption for {name}", name))
            continue
        path = inside(folder, name)
        if path is None:
            report(problems, Problem(where, f"file_name {name!r} points outside the dataset folder {folder}", name))
            continue
        if not path.is_file():
            report(problems, Problem(where, f"image {name} not found in {folder}", name))
            continue
        grouped.setdefault(name, []).extend(captions)
        origins.setdefault(name, where)
    if not grouped:
        detail = "has no rows" if not n_rows else "has no usable rows"
        report(problems, Problem(str(metadata), f"{detail}: this split is empty"))
        return []
    return [
        CaptionSample(id=name, captions=tuple(caps), image=folder / name, origin=origins[name])
        for name, caps in grouped.items()
    ]


def read_sidecar_folder(folder: Path, problems: list[Problem] | None = None) -> list[CaptionSample]:
    """Read images with caption files beside them (`cat.jpg` + `cat.txt`, one caption a line, UTF-8).

    Raises:
        CaptuneError: no captioned image at all; in strict mode any image without a usable caption file.
    """
    samples = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        text_file = path.with_suffix(".txt")
        if not text_file.is_file():
            report(problems, Problem(str(path), f"no caption file {text_file.name} beside it", path.name))
            continue
        if inside(folder, path.name) is None:
            report(problems, Problem(str(path), "symlink points outside the dataset folder", path.name))
            continue
        if inside(folder, text_file.name) is None:
            # The caption is data too: a sidecar linked to ~/.bashrc or /proc/self/environ must not become a
            # training caption (and then a line of report.html).
            report(problems, Problem(str(text_file), "caption file is a symlink pointing outside the dataset folder",
                                     path.name))
            continue
        try:
            text = text_file.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            report(problems, Problem(str(text_file), f"not UTF-8 ({exc.reason} at byte {exc.start}): re-save it as "
                                     "UTF-8", path.name))
            continue
        captions = clean_captions(text.splitlines())
        if not captions:
            report(problems, Problem(str(text_file), f"empty caption for {path.name}", path.name))
            continue
        samples.append(CaptionSample(id=path.name, captions=tuple(captions), image=path, origin=str(text_file)))
    if not samples:
        report(problems, Problem(str(folder), "no images with usable .txt caption files: this split is empty"))
    return samples


def clean_captions(value) -> list[str]:
    """A caption value (string or list of strings) as a list of non-blank, stripped strings.

    Raises:
        ValueError: a caption that is not text (`"text": 42`): a data error the caller reports with its location.
    """
    if value is None:
        return []
    captions = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    for caption in captions:
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"caption {caption!r} is a {type(caption).__name__}, not text (quote it)")
    return [c.strip() for c in captions if c is not None and c.strip()]


def _decode_lines(path: Path, problems: list[Problem] | None) -> tuple[list[str], set[int]]:
    """The file's lines (BOM dropped) and the numbers of lines that are not valid UTF-8 (decoded with U+FFFD)."""
    lines, bad = [], set()
    for number, raw in enumerate(path.read_bytes().splitlines(keepends=True), start=1):
        try:
            lines.append(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError as exc:
            bad.add(number)
            report(problems, Problem(f"{path}:{number}", f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                     f"{exc.start + 1}): re-save the file as UTF-8"))
            lines.append(raw.decode("utf-8", errors="replace"))
    return lines, bad


def _read_jsonl(path: Path, problems: list[Problem] | None):
    lines, bad = _decode_lines(path, problems)
    for number, text in enumerate(lines, start=1):
        if not text.strip() or number in bad:
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            report(problems, Problem(f"{path}:{number}", f"not valid JSON ({exc.msg})"))
            continue
        if not isinstance(row, dict):
            report(problems, Problem(f"{path}:{number}", "expected a JSON object per line"))
            continue
        yield number, row


def _read_csv(path: Path, problems: list[Problem] | None):
    lines, bad = _decode_lines(path, problems)
    reader = csv.DictReader(io.StringIO("".join(lines), newline=""))
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        raise CaptuneError(f"{path}:1: malformed CSV header ({exc})") from exc
    missing = [what for what, names in (("file_name", ("file_name",)), ("caption", CAPTION_COLUMNS))
               if not any(n in header for n in names)]
    if missing:  # one problem for the file, not one per row
        report(problems, Problem(f"{path}:1", f"the header has no {' or '.join(missing)} column (expected file_name "
                                 f"and one of {', '.join(CAPTION_COLUMNS)}; found: {', '.join(header) or 'none'})"))
        return
    try:
        start = 2  # row numbers count the header as line 1, as a spreadsheet shows them
        for row in reader:
            end = reader.line_num  # a quoted caption may span several physical lines
            if not any(n in bad for n in range(start, end + 1)):
                yield start, {k: v for k, v in row.items() if k is not None}
            start = end + 1
    except csv.Error as exc:
        raise CaptuneError(f"{path}:{reader.line_num}: malformed CSV ({exc}): check the quoting") from exc
