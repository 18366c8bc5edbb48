"""Read Hugging Face `datasets`: a `save_to_disk` directory, a local dataset directory, or a hub id.

Images stay in the Arrow table until a DataLoader worker asks for them (`RowImage`): listing a 100k-image dataset
must not decode, or even copy, 100k images in the main process. Works offline on local data; a hub id needs the
network or the local `datasets` cache.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CaptuneError
from .folder import VALIDATION_DIRS, clean_captions
from .records import CaptionSample, Problem, report

IMAGE_COLUMNS = ("image", "img", "jpg", "png")
CAPTION_COLUMNS = ("text", "caption", "captions", "sentences", "sentence", "txt")


def is_saved_dataset(path: Path) -> bool:
    """True for a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


class RowImage:
    """The image of one row, read when called (picklable: a `datasets` table pickles as a memory map)."""

    def __init__(self, table, row: int, column: str, base: Path | None):
        self.table, self.row, self.column, self.base = table, row, column, base

    def __call__(self):
        value = self.table[self.row][self.column]
        if isinstance(value, dict):  # an Image feature read with decode=False: encoded bytes or a file path
            if value.get("bytes"):
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, str):
            return (self.base / value) if self.base and not Path(value).is_absolute() else Path(value)
        return value  # already a PIL image (a plain Python object column)


def load(path: str):
    """Load a DatasetDict (or a Dataset, returned as {"train": it}) from disk, a local directory, or the hub.

    Raises:
        CaptuneError: not loadable, with the reason and the offline hint.
    """
    import datasets

    local = Path(path).expanduser()
    try:
        if local.is_dir() and is_saved_dataset(local):
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(str(local) if local.exists() else path)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CaptuneError(
            f"cannot load Hugging Face dataset {path!r}: {first} (a hub id needs the network or the local cache; "
            "a local directory must come from save_to_disk or hold data files)"
        ) from exc
    return loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def read_hf(path: str, *, image_column: str = "", caption_column: str = "", train_split: str = "train",
            eval_split: str = "", problems: list[Problem] | None = None) -> dict[str, list[CaptionSample]]:
    """Read a `datasets` dataset into {"train", "validation"} samples.

    Args:
        image_column, caption_column: column names; empty = detect (an Image feature / image, img; text, caption...).
        train_split: the split to train on. eval_split: the held-out split; empty = validation, val or test.

    Raises:
        CaptuneError: unknown split or column, no usable rows; in strict mode any bad row.
    """
    splits = load(path)
    if train_split not in splits:
        raise CaptuneError(f"dataset {path!r} has no split {train_split!r} (has: {', '.join(splits)}): set "
                           "data.train_split")
    if eval_split and eval_split not in splits:
        raise CaptuneError(f"dataset {path!r} has no split {eval_split!r} (has: {', '.join(splits)}): set "
                           "data.eval_split")
    held = eval_split or next((n for n in VALIDATION_DIRS if n in splits), "")
    base = Path(path).expanduser() if Path(path).expanduser().exists() else None

    def read(split: str) -> list[CaptionSample]:
        try:
            return _read_split(splits[split], f"{path}[{split}]", image_column, caption_column, base, problems)
        except CaptuneError as exc:
            if problems is None:
                raise
            # A split without its columns (or rows) is one listed problem: `check` goes on to the other split.
            problems.append(Problem(f"{path}[{split}]", str(exc).removeprefix(f"{path}[{split}]: ")))
            return []

    return {"train": read(train_split), "validation": read(held) if held else []}


def _read_split(table, name: str, image_column: str, caption_column: str, base, problems) -> list[CaptionSample]:
    import datasets

    image_column = image_column or _detect(table, IMAGE_COLUMNS, name, "image", datasets.Image)
    caption_column = caption_column or _detect(table, CAPTION_COLUMNS, name, "caption")
    for column in (image_column, caption_column):
        if column not in table.column_names:
            raise CaptuneError(f"{name}: no column {column!r} (has: {', '.join(table.column_names)})")
    if isinstance(table.features[image_column], datasets.Image):
        # Keep the encoded bytes: decoding happens in the workers, with captune's checks.
        table = table.cast_column(image_column, datasets.Image(decode=False))
    samples = []
    for row, value in enumerate(table[caption_column]):
        if isinstance(value, dict):
            value = value.get("raw") or value.get("text")
        raw = [v.get("raw") if isinstance(v, dict) else v for v in value] if isinstance(value, list) else value
        try:
            captions = clean_captions(raw)
        except ValueError as exc:
            report(problems, Problem(f"{name} row {row}", str(exc), str(row)))
            continue
        if not captions:
            report(problems, Problem(f"{name} row {row}", "empty caption", str(row)))
            continue
        samples.append(CaptionSample(id=str(row), captions=tuple(captions),
                                     image=RowImage(table, row, image_column, base), origin=f"{name} row {row}"))
    if not samples:
        raise CaptuneError(f"{name}: no rows with a caption")
    return samples


def _detect(table, names, where: str, what: str, feature_type=None) -> str:
    if feature_type is not None:
        typed = [c for c, f in table.features.items() if isinstance(f, feature_type)]
        if typed:
            return typed[0]
    found = next((c for c in names if c in table.column_names), None)
    if found is None:
        raise CaptuneError(f"{where}: no {what} column among {', '.join(table.column_names)}: pass --{what}-column")
    return found
