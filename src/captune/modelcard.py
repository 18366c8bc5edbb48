"""The README.md model card saved beside every model captune writes (best/, last/), in the Hugging Face format.

YAML front matter (library_name, pipeline_tag, base_model, tags, metrics) then prose: base model, data,
hyperparameters, validation metrics, and a usage snippet that needs plain transformers only, not captune.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .metrics import guard_warnings
from .model import TINY
from .models import family_for

# Metric ids on the Hugging Face Hub (huggingface.co/metrics) for the scores captune reports.
HUB_METRICS = ("bleu", "meteor", "rouge", "cider")
CARD_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice", "exact_match",
                "repeated_ngram_rate", "distinct_captions", "distinct_references", "vocabulary")


def hub_base_model(name: str) -> str | None:
    """`name` when it reads as a Hub id (`owner/model`, not a local path nor the tiny preset); else None.

    The Hub rejects a `base_model` that is not a repository id, so local starting points stay in the prose only.
    """
    if name == TINY or name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).expanduser().exists():
        return None
    return name


def model_card(
    *,
    base_model: str,
    data: dict,
    hyperparameters: dict,
    metrics: dict | None,
    generation: dict,
    prompt: str = "",
    step: int | None = None,
    family=None,
) -> str:
    """Render the model card.

    Args:
        base_model: what training started from (hub id, local directory or `tiny`).
        data: dataset facts: `path` and counts such as `train_images`, `validation_images`.
        hyperparameters: name -> value (the `train` section of the resolved config).
        metrics: validation metrics of this model (None or empty when there was no validation).
        generation: decoding options validation used (num_beams, max_new_tokens, min_new_tokens).
        prompt: caption prefix used in training; captions must be generated from it.
        step: optimizer step these weights are from.
        family: the model's family module (captune.models): its name, class and plain-transformers usage;
            default: the family of `base_model`.

    Returns:
        The README.md text.
    """
    family = family or family_for(base_model)
    # transformers 5 removed the `image-to-text` pipeline (it now builds `image-text-to-text`, which needs a text
    # input): the tag names the task transformers 5 has.
    front = {"library_name": "transformers", "pipeline_tag": "image-text-to-text"}
    hub_id = hub_base_model(base_model)
    if hub_id:
        front["base_model"] = hub_id
    front["tags"] = ["image-captioning", family.NAME, "captune"]
    front["metrics"] = list(HUB_METRICS)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {family.TITLE} captioner fine-tuned with captune", ""]
    lines += [
        f"A `{family.MODEL_CLASS}` image captioner fine-tuned from `{base_model}`"
        + (f", weights from optimizer step {step}." if step is not None else "."),
        "",
        "## Base model",
        "",
        f"`{base_model}`" + ("" if hub_id else " (not a Hugging Face Hub id: a local directory or captune's "
                                                 "randomly initialised `tiny` preset)."),
        "",
        "## Data",
        "",
    ]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in data.items()]
    lines += ["", "## Hyperparameters", "", "| name | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in hyperparameters.items()]
    lines += ["", "## Validation metrics", ""]
    if metrics:
        decoding = ", ".join(f"{k} {v}" for k, v in generation.items())
        lines += [f"COCO caption metrics (pycocoevalcap scorers) on the validation images; decoding: {decoding}.", "",
                  "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_value(metrics[k])} |" for k in CARD_METRICS if isinstance(metrics.get(k), (int, float))]
        lines += ["", "repeated_ngram_rate: share of captions repeating a word or a word trigram; distinct_captions: "
                  "distinct captions / images (distinct_references: the same for the references); vocabulary: "
                  "distinct words used."]
        warnings = guard_warnings(metrics, images=data.get("validation_images"))
        if warnings:
            lines += ["", "**Warning.** " + " ".join(warnings)]
    else:
        lines.append("No validation data was given, so no metrics were computed.")
    lines += ["", "## Usage", "", "With plain transformers (no captune needed):", "", family.usage_snippet(prompt, snippet_options(generation)),
              ""]
    if family.NAME == "blip":  # the pipeline path is tested for BLIP only (tests/test_report.py runs it)
        lines += ["Or through the pipeline (transformers 5: the `image-text-to-text` task, which needs `text`; "
                  "`text=\"\"` for no prompt):", "", pipeline_snippet(prompt, snippet_options(generation)), ""]
    return "\n".join(lines)


def _value(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def snippet_options(generation: dict) -> dict:
    """The generate() keyword arguments worth showing: options at transformers' own defaults are left out, and
    length_penalty only scores beams."""
    idle = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "length_penalty": 1.0}
    return {k: v for k, v in generation.items() if idle.get(k, object()) != v
            and not (k == "length_penalty" and generation.get("num_beams", 1) == 1)}


def pipeline_snippet(prompt: str, generation: dict) -> str:
    """BLIP's captions through `transformers.pipeline` (MODEL as in the family's usage snippet)."""
    kwargs = ", ".join(f"{k}={_value(v)}" for k, v in generation.items())
    return f"""```python
from transformers import pipeline

MODEL = "path/to/this/directory"  # or the Hub repo id you uploaded it to
captioner = pipeline("image-text-to-text", model=MODEL)
result = captioner("photo.jpg", text={prompt.strip()!r}, return_full_text=False, generate_kwargs=dict({kwargs}))
print(result[0]["generated_text"].strip())
```"""
