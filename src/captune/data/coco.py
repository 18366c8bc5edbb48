"""Read COCO-style caption annotations: the official captions JSON and Karpathy's split file.

COCO captions (`captions_train2017.json`):
    {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}
    Images are under the image root (`--image-root`, default the JSON's folder). Everything is one split (train);
    hold out validation with --val-split, or point eval at the val JSON.
Karpathy split (`dataset_coco.json`, also Flickr8k/30k):
    {"images": [{"split", "filepath", "filename", "sentences": [{"raw"}]}]}
    Image at ROOT/filepath/filename. `restval` is folded into train, as BLIP does; val -> validation, test -> test.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CaptuneError
from .folder import clean_captions, inside
from .records import CaptionSample, Problem, report

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}


def load_json(path: Path) -> dict:
    """Parse an annotation file.

    Raises:
        CaptuneError: missing, not UTF-8, or not a JSON object.
    """
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError as exc:
        raise CaptuneError(f"annotation file {path} not found: check --data") from exc
    except IsADirectoryError as exc:
        raise CaptuneError(f"{path} is a directory: COCO and Karpathy data are a .json annotation file "
                           "(pass it with --data, and the images with --image-root)") from exc
    except UnicodeDecodeError as exc:
        raise CaptuneError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}): re-save it as UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise CaptuneError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(value, dict) or not isinstance(value.get("images"), list):
        raise CaptuneError(f"{path}: expected a JSON object with an 'images' list (COCO or Karpathy format)")
    return value


def is_karpathy(value: dict) -> bool:
    """Karpathy files carry captions inside each image (`sentences`); COCO files in a separate `annotations`."""
    images = value.get("images") or [{}]
    return "annotations" not in value and isinstance(images[0], dict) and "sentences" in images[0]


def read_coco(path: Path, image_root: Path | None = None,
              problems: list[Problem] | None = None) -> list[CaptionSample]:
    """Read a COCO captions JSON into samples (one per image, all its captions).

    Raises:
        CaptuneError: malformed file, no usable images; in strict mode any bad image or annotation.
    """
    value = load_json(path)
    if not isinstance(value.get("annotations"), list):
        raise CaptuneError(f"{path}: no 'annotations' list: a COCO captions file has images and annotations")
    root = image_root or path.parent
    names: dict = {}
    for n, image in enumerate(value["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            report(problems, Problem(f"{path}: images[{n}]", "needs 'id' and 'file_name'"))
            continue
        names[image["id"]] = str(image["file_name"])
    captions: dict = {}
    for n, annotation in enumerate(value["annotations"]):
        where = f"{path}: annotations[{n}]"
        if not isinstance(annotation, dict) or "image_id" not in annotation:
            report(problems, Problem(where, "needs 'image_id' and 'caption'"))
            continue
        image_id = annotation["image_id"]
        if image_id not in names:
            report(problems, Problem(where, f"image_id {image_id} is not in 'images'"))
            continue
        try:
            found = clean_captions(annotation.get("caption"))
        except ValueError as exc:
            report(problems, Problem(where, f"{exc} for {names[image_id]}", names[image_id]))
            continue
        if not found:
            report(problems, Problem(where, f"empty caption for {names[image_id]}", names[image_id]))
            continue
        captions.setdefault(image_id, []).extend(found)
    samples = []
    for image_id, caps in captions.items():
        sample = _sample(root, names[image_id], caps, f"{path}: image id {image_id}", problems)
        if sample is not None:
            samples.append(sample)
    if not samples:
        report(problems, Problem(str(path), f"no image with a caption and an image file under {root}: check "
                                 "--image-root"))
    return samples


def read_karpathy(path: Path, image_root: Path | None = None,
                  problems: list[Problem] | None = None) -> dict[str, list[CaptionSample]]:
    """Read a Karpathy split file into {"train", "validation", "test"} (restval folded into train).

    Raises:
        CaptuneError: malformed file, no training images; in strict mode any bad entry.
    """
    value = load_json(path)
    root = image_root or path.parent
    splits: dict[str, list[CaptionSample]] = {"train": [], "validation": [], "test": []}
    for n, image in enumerate(value["images"]):
        where = f"{path}: images[{n}]"
        if not isinstance(image, dict) or "filename" not in image:
            report(problems, Problem(where, "needs 'filename', 'split' and 'sentences'"))
            continue
        name = str(Path(image.get("filepath") or "") / image["filename"])
        split = KARPATHY_SPLITS.get(image.get("split"))
        if split is None:
            report(problems, Problem(where, f"unknown split {image.get('split')!r} (expected train, restval, val, "
                                     "test)", name))
            continue
        raw = [s.get("raw") if isinstance(s, dict) else s for s in image.get("sentences") or []]
        try:
            captions = clean_captions(raw)
        except ValueError as exc:
            report(problems, Problem(where, f"{exc} for {name}", name))
            continue
        if not captions:
            report(problems, Problem(where, f"empty caption for {name}", name))
            continue
        sample = _sample(root, name, captions, where, problems)
        if sample is not None:
            splits[split].append(sample)
    if not splits["train"]:
        report(problems, Problem(str(path), f"no usable 'train' or 'restval' images under {root}: check --image-root"))
    return splits


def _sample(root: Path, name: str, captions: list[str], where: str, problems) -> CaptionSample | None:
    if "\0" in name:
        report(problems, Problem(where, f"file name {name!r} contains a NUL byte", name.replace("\0", "\\0")))
        return None
    path = inside(root, name)
    if path is None:
        report(problems, Problem(where, f"file name {name!r} points outside the image root {root}", name))
        return None
    if not path.is_file():
        report(problems, Problem(where, f"image {name} not found in {root}", name))
        return None
    return CaptionSample(id=name, captions=tuple(captions), image=path, origin=where)
