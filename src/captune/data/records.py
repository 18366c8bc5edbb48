"""The one sample type every data source produces, the problem record, and the image decoder they share.

Images are decoded here and nowhere else, so every source gets the same treatment of dirty input: EXIF orientation,
odd modes (CMYK, palette with transparency, LA, 16-bit grey) converted to RGB correctly, animated files reduced to
their first frame, decompression bombs refused, and JPEG draft decoding for speed.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..errors import CaptuneError

# Where an image comes from: a file, encoded bytes, an already decoded image, or a zero-argument callable returning
# one of those (a row of a `datasets` table, read lazily so workers decode it, not the process building the list).
ImageSource = Union[Path, bytes, Image.Image, Callable[[], object]]

DEFAULT_MAX_PIXELS = 100_000_000
"""Refuse images over this many pixels (a 10000x10000 photo): a decompression bomb would exhaust memory."""


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


@dataclass(frozen=True)
class Problem:
    """Something wrong with one sample: where (file[:line]), why, and the sample id when there is one."""

    where: str
    reason: str
    id: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


def report(problems: list[Problem] | None, problem: Problem) -> None:
    """Record `problem`, or raise it at once when the caller keeps no list (strict reading).

    Raises:
        CaptuneError: `problems` is None.
    """
    if problems is None:
        raise CaptuneError(str(problem))
    problems.append(problem)


def open_image(source: ImageSource, origin: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image lazily (header only) and refuse decompression bombs before any pixel is decoded.

    Raises:
        CaptuneError: missing file, not an image, or more than `max_pixels` pixels.
    """
    where = label(source, origin)
    if callable(source) and not isinstance(source, Image.Image):
        source = source()
    if max_pixels and Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # Pillow refuses images over 2x its own limit (~179M pixels) before our check could allow them: raise its
        # limit to ours (never lower it: other code in the process may rely on it), so ours is the one that counts.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit; ours is checked just below, with a message that says what to do.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                image = source
            elif isinstance(source, (bytes, bytearray)):
                if not source:
                    raise CaptuneError(f"{where}: empty image (0 bytes)")
                image = Image.open(io.BytesIO(source))
            else:
                path = Path(source)
                if path.is_file() and path.stat().st_size == 0:
                    raise CaptuneError(f"{where}: empty image file {path} (0 bytes)")
                image = Image.open(path)
    except FileNotFoundError as exc:
        raise CaptuneError(f"{where}: image file not found: {source}") from exc
    except Image.DecompressionBombError as exc:
        raise CaptuneError(f"{where}: image refused as a decompression bomb ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        what = "truncated image" if "truncated" in str(exc).lower() else "not a readable image"
        raise CaptuneError(f"{where}: {what} ({_reason(exc)})") from exc
    width, height = image.size
    if max_pixels and width * height > max_pixels:
        raise CaptuneError(
            f"{where}: image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(a decompression bomb guard): shrink it or raise data.max_image_pixels"
        )
    return image


def to_rgb(image: Image.Image, where: str = "", draft_size: int = 0) -> Image.Image:
    """Decode `image` to 8-bit RGB: first frame, EXIF orientation, transparency on white, 16-bit scaled down.

    Args:
        draft_size: for JPEGs, let libjpeg decode at the smallest 1/2, 1/4 or 1/8 scale still at least this many
            pixels on each side (the model resizes to a square of this size anyway); 0 = full size.

    Raises:
        CaptuneError: corrupt or truncated pixel data.
    """
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)
        if draft_size and image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK"):
            image.draft(image.mode, (draft_size, draft_size))
        image.load()
        image = ImageOps.exif_transpose(image)
        return _convert(image)
    except CaptuneError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CaptuneError(f"{where or 'image'}: corrupt or truncated image ({_reason(exc)})") from exc


def _convert(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's own convert clips 16-bit values at 255 (a white image); scale the range instead.
        values = np.asarray(image).astype(np.float64)
        if mode == "F":
            scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0 if (mode.startswith("I;16") or values.max(initial=0) > 255) else 1.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if (mode == "P" and "transparency" in image.info) or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        # Transparent pixels carry arbitrary colours (often black); white is what a viewer shows.
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(source: ImageSource, origin: str = "", *, max_pixels: int = DEFAULT_MAX_PIXELS,
             draft_size: int = 0) -> Image.Image:
    """Open and decode an image to RGB (see `open_image` and `to_rgb`).

    Raises:
        CaptuneError: the file is missing, not an image, too large, or corrupt; the message names `origin`.
    """
    return to_rgb(open_image(source, origin, max_pixels), label(source, origin), draft_size)


def image_bytes(source: ImageSource) -> bytes | None:
    """The encoded bytes of a source, for duplicate detection (decoded pixels for in-memory images)."""
    if callable(source) and not isinstance(source, Image.Image):
        source = source()
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, Image.Image):
        return source.tobytes()
    try:
        return Path(source).read_bytes()
    except OSError:
        return None


def label(source: ImageSource, origin: str = "") -> str:
    """How messages name an image: its metadata row and its file (`metadata.jsonl:6: data/cat.jpg`)."""
    if isinstance(source, Path) and origin and str(source) not in origin:
        return f"{origin}: {source}"
    return origin or _describe(source)


def _describe(source: ImageSource) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes of image data>"
    if isinstance(source, Image.Image):
        return f"<{source.width}x{source.height} {source.mode} image>"
    return str(source)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    # PIL names in-memory sources by address ("<_io.BytesIO object at 0x7f..>"): drop it, so the same bad image
    # gives the same reason every time it is met (skips are de-duplicated by reason).
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", " in memory", text)
    return text.splitlines()[0] if text else type(exc).__name__


# Truncated files must fail loudly, never decode as a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False
