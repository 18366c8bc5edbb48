"""`captune check`: read a whole dataset the way training will and say precisely what is wrong, before a GPU-hour.

Every image is opened and decoded with the training decoder (so what passes here decodes in training), captions are
tokenised with the model's tokenizer (`--model`; default the tiny preset's, BLIP's) and counted against its family's
caption limit the way its training rows are built, and every problem is listed with its file (and line) and reason.
"""

from __future__ import annotations

import hashlib
from collections import Counter
import numpy as np
from tqdm.auto import tqdm

from ..errors import CaptuneError
from .records import DEFAULT_MAX_PIXELS, CaptionSample, Problem, image_bytes, label, open_image, to_rgb


def check_dataset(path: str, *, data_format: str = "auto", image_root: str = "", image_column: str = "",
                  caption_column: str = "", train_split: str = "train", eval_split: str = "",
                  max_caption_tokens: int = 40, prompt: str = "", max_image_pixels: int = DEFAULT_MAX_PIXELS,
                  model: str = "tiny", progress: bool = False) -> dict:
    """Check a dataset; returns a JSON-ready report (see `format_report`). `report["errors"]` > 0 means unusable
    samples (or a dataset that cannot be read at all, reported as one problem). Caption lengths are counted as
    `model`'s family builds its training rows (`captune.models.caption_counter`); `truncated` is how many
    captions exceed `max_caption_tokens` and would lose their end in training. `progress` draws a bar per split on
    stderr."""
    from ..models import caption_counter

    from . import build_dataset, wds

    report: dict = {"data": str(path), "format": data_format, "splits": {}, "problems": []}
    try:
        data = build_dataset(path, data_format=data_format, image_root=image_root, image_column=image_column,
                             caption_column=caption_column, train_split=train_split, eval_split=eval_split,
                             strict=False, require_train=False)
    except CaptuneError as exc:
        report["problems"].append({"where": str(path), "id": "", "reason": str(exc)})
        report["errors"] = 1
        return report
    report["format"] = data.format
    problems: list[Problem] = list(data.problems)
    splits = {"train": data.train, "validation": data.validation, "test": data.test}
    lengths: list[int] = []
    sizes: list[tuple[int, int]] = []
    modes: Counter = Counter()
    hashes: dict[str, list[str]] = {}
    count_tokens = caption_counter(model, prompt)
    for split, samples in splits.items():
        if not isinstance(samples, list):  # streamed shards: read them through, as training will
            samples = _shard_samples(wds.iter_samples(samples.paths), problems)
        images = captions = 0
        total = len(samples) if isinstance(samples, list) else None
        for sample in tqdm(samples, total=total, desc=f"checking {split}", unit="img", disable=not progress or total == 0,
                           leave=False):
            problem = _check_image(sample, max_image_pixels, sizes, modes, hashes, split)
            if problem is not None:
                problems.append(problem)
                continue
            images += 1
            captions += len(sample.captions)
            lengths.extend(count_tokens(sample.captions))
        if images or split == "train":
            report["splits"][split] = {"images": images, "captions": captions}
    report["caption_tokens"] = _stats(lengths) | {
        "max_caption_tokens": max_caption_tokens, "truncated": sum(n > max_caption_tokens for n in lengths),
        "model": model}
    report["image_sizes"] = {
        "width": _stats([w for w, _ in sizes]), "height": _stats([h for _, h in sizes])}
    report["modes"] = dict(modes.most_common())
    report["duplicates"] = [ids for ids in hashes.values() if len(ids) > 1]
    report["problems"] = [{"where": p.where, "id": p.id, "reason": p.reason} for p in problems]
    report["errors"] = len(problems)
    return report


def _shard_samples(items, problems: list[Problem]):
    for item in items:
        if isinstance(item, Problem):
            problems.append(item)
        elif item is not None:
            yield item


def _check_image(sample: CaptionSample, max_pixels: int, sizes, modes, hashes, split: str) -> Problem | None:
    where = label(sample.image, sample.origin or sample.id)
    try:
        image = open_image(sample.image, where, max_pixels)
        size, mode = image.size, image.mode
        to_rgb(image, where)
    except CaptuneError as exc:
        # The decoder's messages already start with the origin; keep the reason alone beside `where`.
        reason = str(exc)
        return Problem(where, reason[len(where) + 2:] if reason.startswith(f"{where}: ") else reason, sample.id)
    except Exception as exc:  # what PIL does not wrap (bad EXIF, a null dataset cell): still a listed problem
        return Problem(where, f"cannot decode image ({exc!r})", sample.id)
    sizes.append(size)
    modes[mode] += 1
    encoded = image_bytes(sample.image)
    if encoded is not None:
        digest = hashlib.sha256(encoded).hexdigest()
        hashes.setdefault(digest, []).append(f"{split}:{sample.id}")
    return None


def _stats(values: list[int]) -> dict:
    if not values:
        return {"min": None, "median": None, "p95": None, "max": None}
    array = np.asarray(values)
    return {"min": int(array.min()), "median": float(np.median(array)), "p95": float(np.percentile(array, 95)),
            "max": int(array.max())}


def format_report(report: dict) -> str:
    """The report for people: counts, lengths, sizes, duplicates, then every problem on its own line."""
    lines = [f"{report['data']} ({report['format']})"]
    for split, counts in report["splits"].items():
        lines.append(f"  {split:<11} {counts['images']:>8} images {counts['captions']:>8} captions")
    tokens = report.get("caption_tokens")
    if tokens and tokens["min"] is not None:
        lines.append(f"  caption tokens: min {tokens['min']} median {tokens['median']:g} p95 {tokens['p95']:g} max "
                     f"{tokens['max']}; {tokens['truncated']} over max_caption_tokens={tokens['max_caption_tokens']}"
                     + (f" ({tokens['model']}'s tokens; training truncates them)" if tokens["truncated"] else ""))
    sizes = report.get("image_sizes")
    if sizes and sizes["width"]["min"] is not None:
        w, h = sizes["width"], sizes["height"]
        lines.append(f"  image sizes: width {w['min']}-{w['max']} (median {w['median']:g}), height {h['min']}-"
                     f"{h['max']} (median {h['median']:g})")
        lines.append("  modes: " + ", ".join(f"{m} {n}" for m, n in report["modes"].items()))
    for group in report.get("duplicates", []):
        lines.append(f"  duplicate images (same bytes): {', '.join(group)}")
    for problem in report["problems"]:
        lines.append(f"error: {problem['where']}: {problem['reason']}")
    lines.append(f"{report['errors']} error(s)" if report["errors"] else "ok: no errors")
    return "\n".join(lines)

