"""Generate captions over a dataset (on every process, gathered) and score them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data.collate import CaptionImages, ImageCollator
from .data.records import CaptionSample
from .errors import CaptuneError
from .generate import GenerationOptions, caption_pixels
from .metrics import score
from .models import family_of

log = logging.getLogger("captune")


@dataclass
class EvalResult:
    metrics: dict
    predictions: list[dict]
    """One record per image: id, image (path string when read from a file, else None), prediction, references,
    and that image's cider and bleu_4."""


def predict(
    model,
    processor,
    samples: list[CaptionSample],
    options: GenerationOptions,
    *,
    accelerator=None,
    batch_size: int = 32,
    num_workers: int = 0,
    desc: str = "captioning",
) -> list[str | None]:
    """Caption every sample's image; with an Accelerator, each process takes a shard and results are gathered.

    Returns:
        Captions in the order of `samples` (identical on every process); None for an image that could not be read
        (logged once, with the reason).
    """
    loader = DataLoader(
        CaptionImages(samples), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=ImageCollator(processor, family_of(model)),
    )
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader, device_placement=True)
        model = accelerator.unwrap_model(model)
        show = accelerator.is_local_main_process
    else:
        show = True
    was_training = model.training
    model.eval()
    found: dict[int, str] = {}
    with tqdm(total=len(samples), desc=desc, unit="img", disable=not show, leave=False) as bar:
        for batch in loader:
            captions = caption_pixels(model, processor, batch["pixel_values"], options)
            pairs = [(i, None if problem else c, problem)
                     for i, c, problem in zip(batch["index"].tolist(), captions, batch["problems"])]
            if accelerator is not None:
                # gather_for_metrics drops the samples the sampler repeated to even out the last batch.
                pairs = accelerator.gather_for_metrics(pairs, use_gather_object=True)
            for index, caption, problem in pairs:
                found[index] = caption
                if problem and show:
                    log.warning("left out of evaluation: %s", problem)
            bar.update(len(pairs))
    model.train(was_training)
    missing = [i for i in range(len(samples)) if i not in found]
    if missing:
        raise RuntimeError(f"evaluation lost {len(missing)} images (first index {missing[0]})")
    return [found[i] for i in range(len(samples))]


def evaluate(model, processor, samples: list[CaptionSample], options: GenerationOptions, *, meteor: bool = True,
             **kwargs) -> EvalResult:
    """Caption `samples` and score against all their captions (METEOR skipped when `meteor` is False).

    Keyword arguments go to `predict`.
    """
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise CaptuneError(f"evaluation samples repeat ids ({', '.join(repeated)}): scores are keyed by id; give "
                           "each held-out image a unique name")
    captions = predict(model, processor, samples, options, **kwargs)
    readable = [(s, c) for s, c in zip(samples, captions) if c is not None]
    if not readable:
        raise CaptuneError(f"none of the {len(samples)} evaluation images could be read: run `captune check` on the data")
    predictions = {s.id: c for s, c in readable}
    references = {s.id: list(s.captions) for s, _ in readable}
    accelerator = kwargs.get("accelerator")
    if accelerator is None or accelerator.num_processes == 1:
        metrics = score(predictions, references, meteor=meteor, per_item=True)
    else:
        # Every process holds all captions; one scores (one set of Java processes) and shares the result.
        shared = [score(predictions, references, meteor=meteor, per_item=True) if accelerator.is_main_process else None]
        broadcast_object_list(shared, from_process=0)
        metrics = shared[0]
    if len(readable) < len(samples):
        metrics["unreadable_images"] = len(samples) - len(readable)
    # Per-image scores cost nothing extra (the scorers compute them anyway); the report ranks examples by them.
    per_item = metrics.pop("per_item")
    unscored = {"cider": None, "bleu_4": None}
    records = [
        {"id": s.id, "image": image_path(s), "prediction": c, "references": list(s.captions),
         **per_item.get(s.id, unscored)}
        for s, c in zip(samples, captions)
    ]
    return EvalResult(metrics=metrics, predictions=records)


def merge_predictions(by_model: dict[str, list[dict]]) -> list[dict]:
    """One record per image with a column per model: {id, image, references, models: {name: {prediction, cider,
    bleu_4}}}, from per-model records of the same samples in the same order."""
    merged = []
    for rows in zip(*by_model.values()):
        first = rows[0]
        assert all(r["id"] == first["id"] for r in rows), "models were scored on different samples"
        models = {name: {k: r[k] for k in ("prediction", "cider", "bleu_4")} for name, r in zip(by_model, rows)}
        merged.append({"id": first["id"], "image": first["image"], "references": first["references"], "models": models})
    return merged


def image_path(sample: CaptionSample) -> str | None:
    """The sample's image file as an absolute path string, or None when its pixels do not come from a file."""
    if isinstance(sample.image, (str, Path)):
        return str(Path(sample.image).resolve())
    return None
