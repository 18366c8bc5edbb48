"""The Python API: `Captioner.load(path).caption(images)`, used by the `caption` command and the server.

    from captune import Captioner
    captioner = Captioner.load("runs/captune/best")
    captioner.caption(["a.jpg", Path("b.png"), open("c.webp", "rb").read()], num_beams=3)

Generation defaults come from the model directory's captune.json (prompt, beams, lengths recorded at training time),
so a caller gets the captions the run was evaluated with unless it asks otherwise.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Iterable, Union

import torch
from PIL import Image

from .data.records import load_rgb
from .errors import CaptuneError
from .generate import RECORDED_OPTIONS, GenerationOptions, caption_images
from .model import load_captune_settings, load_model_and_processor
from .speed import quantize_int8, require_cpu_for_int8

# What `caption` accepts per image: a decoded image, a file path, or the encoded file's bytes.
ImageInput = Union[Image.Image, str, Path, bytes]
# num_return_sequences is left out: `caption` promises one caption per image.
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(GenerationOptions) if f.name != "num_return_sequences")


class Captioner:
    """A loaded captioner: model, processor and the generation defaults of its directory.

    Thread-safe: generation is serialised by a lock, so one instance can be shared by threads (the server runs it in
    a single worker thread anyway, batching requests itself).
    """

    def __init__(self, model, processor, defaults: GenerationOptions | None = None, name: str = ""):
        self.model = model.eval()
        self.processor = processor
        self.defaults = defaults or GenerationOptions()
        self.name = name
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, int8: bool = False,
             **defaults) -> "Captioner":
        """Load a model directory (full or LoRA adapter, as `captune.model` understands it), a hub id, or `tiny`.

        Args:
            path: what `load_model_and_processor` accepts.
            device: where the model runs; default CUDA when available, else CPU (always CPU with int8).
            int8: dynamic int8 quantization of the Linear layers (`captune.speed.quantize_int8`): faster on CPU,
                captions can differ slightly from fp32 ones. CPU only.
            **defaults: generation options overriding the directory's recorded ones (e.g. num_beams=3).

        Raises:
            CaptuneError: the model cannot be loaded, an option is invalid, or int8 was asked for on a GPU.
        """
        name = str(path)
        if int8:
            device = torch.device(device or "cpu")
            require_cpu_for_int8(device)  # before the (slow) load
        else:
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, processor = load_model_and_processor(name)
        model.to(device)
        if int8:
            quantize_int8(model)
        settings = load_captune_settings(name)
        saved = settings.get("generation", {})
        recorded = {key: saved[key] for key in RECORDED_OPTIONS if key in saved}
        if settings.get("prompt"):
            recorded["prompt"] = settings["prompt"]
        base = _options(GenerationOptions(), recorded)
        return cls(model, processor, _options(base, defaults), name=name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def options(self, options: GenerationOptions | None = None, **overrides) -> GenerationOptions:
        """The generation options a call would use: `options` (or the defaults) with `overrides` applied.

        Raises:
            CaptuneError: an unknown option name or an invalid value.
        """
        return _options(options or self.defaults, overrides)

    def caption(self, images: ImageInput | Iterable[ImageInput], options: GenerationOptions | None = None,
                batch_size: int = 16, **overrides) -> list[str]:
        """Caption images.

        Args:
            images: one image or a sequence of them: PIL images, file paths (str or Path) or encoded bytes.
            options: generation options replacing the defaults; keyword `overrides` apply on top (num_beams=3, ...).
            batch_size: images per generate() call.

        Returns:
            One caption per image, in order (always a list, also for a single image).

        Raises:
            CaptuneError: an image cannot be read, or an option is invalid.
        """
        if isinstance(images, (Image.Image, str, Path, bytes)):
            images = [images]
        decoded = [load_rgb(Path(image) if isinstance(image, str) else image, origin=_describe(image))
                   for image in images]
        return self.caption_decoded(decoded, self.options(options, **overrides), batch_size=batch_size)

    def caption_decoded(self, images: list[Image.Image], options: GenerationOptions, batch_size: int = 16) -> list[str]:
        """Caption already decoded RGB images with exactly `options` (what the CLI and server batches call)."""
        if not images:
            return []
        with self._lock:
            return caption_images(self.model, self.processor, images, options, batch_size=batch_size)


def _options(base: GenerationOptions, overrides: dict) -> GenerationOptions:
    unknown = sorted(set(overrides) - set(OPTION_NAMES))
    if unknown:
        raise CaptuneError(f"unknown generation option(s) {', '.join(unknown)}; known: {', '.join(OPTION_NAMES)}")
    try:
        return dataclasses.replace(base, **overrides)
    except (ValueError, TypeError) as exc:
        raise CaptuneError(f"generation options: {exc}") from exc


def _describe(image: ImageInput) -> str:
    if isinstance(image, bytes):
        return f"<{len(image)} bytes>"
    if isinstance(image, Image.Image):
        return f"<{image.mode} image {image.width}x{image.height}>"
    return str(image)
