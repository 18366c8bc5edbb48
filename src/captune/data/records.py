"""The one sample type every data source produces, and the image loader they share."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps

from ..errors import CaptuneError

# Where an image comes from: a file, encoded bytes, or an already decoded image (e.g. from `datasets`).
ImageSource = Union[Path, bytes, Image.Image]


@dataclass(frozen=True)
class CaptionSample:
    """One image and all of its captions.

    Attributes:
        id: stable identifier, unique within a split (the file name relative to the dataset root for folders).
        captions: every caption of this image; training draws from them, evaluation uses all as references.
        image: where to read the pixels from (see `load_rgb`).
        origin: human-readable location for error messages (file and line of the metadata row).
    """

    id: str
    captions: tuple[str, ...]
    image: ImageSource = field(repr=False)
    origin: str = ""


def load_rgb(source: ImageSource, origin: str = "") -> Image.Image:
    """Decode an image to RGB with EXIF orientation applied.

    Raises:
        CaptuneError: the file is missing or is not a readable image.
    """
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, bytes):
            image = Image.open(io.BytesIO(source))
        else:
            image = Image.open(source)
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except FileNotFoundError as exc:
        raise CaptuneError(f"image not found: {source} ({origin or 'no origin'})") from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CaptuneError(f"cannot read image {origin or source}: {exc}") from exc
