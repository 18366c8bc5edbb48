"""`captune demo`: the embedded default. Synthetic shapes, a tiny preset (BLIP's `tiny` unless `--model` names another
family's), before/after captions and metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .config import load_config
from .data import build_dataset
from .data.synthetic import make_synthetic
from .errors import CaptuneError
from .evaluate import EvalResult, evaluate
from .files import write_json
from .metrics import format_metrics_table
from .model import TINY, load_model_and_processor
from .models import PRESETS
from .train import eval_options, train

log = logging.getLogger("captune")

# The recipe `configs/tiny.yaml` mirrors (a test keeps them equal). Captions are 2-3 words, so no minimum length.
DEMO_RECIPE = {
    "model": {"name": TINY},
    "data": {"num_workers": 0},
    "train": {"epochs": 10, "batch_size": 16, "lr": 1e-3, "warmup_ratio": 0.05, "log_every_steps": 10},
    "eval": {"num_beams": 1, "max_new_tokens": 8, "min_new_tokens": 0, "batch_size": 64},
}
N_TRAIN, N_VAL = 1500, 100
# The other tiny presets' demo training, on top of DEMO_RECIPE's data, decoding and logging and of their family's
# defaults for the preset (lr, batch size) unless a row sets them: each row is what was measured to reach held-out
# exact match >= 0.8 within 10 CPU-minutes (figures and commands: README, "Model families"). A preset without a row
# trains for DEMO_RECIPE's epochs.
DEMO_TRAIN = {
    "tiny-blip2": {"epochs": 15},
    "tiny-blip2-t5": {"epochs": 30},
    "tiny-git": {"epochs": 20},
}


def demo_recipe(preset: str = TINY) -> dict:
    """The demo's recipe for a tiny preset: `tiny` gets DEMO_RECIPE; another family's preset the same decoding, with
    its family's defaults for the preset (learning rate, batch size) and its DEMO_TRAIN row on top.

    Raises:
        CaptuneError: `preset` is not one of the offline tiny presets.
    """
    if preset not in PRESETS:
        raise CaptuneError(f"the demo runs an offline tiny preset, not {preset!r}: use --model with one of "
                           f"{', '.join(PRESETS)}")
    if preset == TINY:
        return DEMO_RECIPE
    recipe = _merged(DEMO_RECIPE, {"model": {"name": preset}})
    recipe["train"] = {k: v for k, v in recipe["train"].items() if k not in ("lr", "batch_size")}
    recipe["train"].update(DEMO_TRAIN.get(preset, {}))
    return recipe


def run_demo(output: str | Path, epochs: int | None = None, n_train: int = N_TRAIN, n_val: int = N_VAL,
             model: str = TINY) -> dict:
    """Run the demo end to end on the tiny preset `model`; returns {"before": metrics, "after": metrics,
    "examples": [...]}."""
    output = Path(output)
    recipe = demo_recipe(model)
    data_dir = make_synthetic(output / "data", n_train=n_train, n_val=n_val)
    log.info("synthetic data: %d training and %d held-out images in %s", n_train, n_val, data_dir)
    overrides = {"output": str(output), "data": {"path": str(data_dir)}}
    if epochs is not None:
        overrides["train"] = {"epochs": epochs}
    cfg = load_config(None, _merged(recipe, overrides))
    held_out = build_dataset(data_dir).validation
    options = eval_options(cfg)

    model, processor = load_model_and_processor(cfg.model.name, seed=cfg.train.seed)
    before = evaluate(model, processor, held_out, options, batch_size=cfg.eval.batch_size, desc="captioning before")
    # Rerunning the demo replaces the previous demo's run (demo.json marks it as one), never another run.
    result = train(cfg, model=model, processor=processor, before=before, overwrite=(output / "demo.json").is_file())
    if result.best_step == result.steps:
        # best/ is the final model, which train() has just scored on these images (METEOR included).
        lines = (output / "val_predictions.jsonl").read_text(encoding="utf-8").splitlines()
        after = EvalResult(metrics=result.final_metrics, predictions=[json.loads(line) for line in lines])
    else:
        tuned, tuned_processor = load_model_and_processor(str(output / "best"))
        after = evaluate(tuned, tuned_processor, held_out, options, batch_size=cfg.eval.batch_size,
                         desc="captioning after")

    tuned_captions = {a["id"]: a["prediction"] for a in after.predictions}
    examples = [
        {"id": b["id"], "reference": b["references"][0], "before": b["prediction"], "after": tuned_captions[b["id"]]}
        for b in before.predictions[:5]
    ]
    summary = {"before": before.metrics, "after": after.metrics, "examples": examples}
    write_json(output / "demo.json", summary)
    print(f"\nHeld-out metrics before and after fine-tuning {cfg.model.name}:")
    print(format_metrics_table({"before": before.metrics, "after": after.metrics}))
    print("\nExamples (reference | before | after):")
    for example in examples:
        print(f"  {example['reference']:<22} | {example['before'][:30]:<30} | {example['after']}")
    print(f"\nRun directory: {output} (best/, last/, metrics.jsonl, demo.json; open report.html in a browser)")
    return summary


def _merged(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in extra.items():
        if isinstance(value, dict):
            out.setdefault(key, {}).update(value)
        else:
            out[key] = value
    return out
