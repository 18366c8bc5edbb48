"""The tiny model really learns the synthetic captions: loss falls, held-out exact match rises far above untrained."""

import json

import pytest

from captune.config import load_config
from captune.data import build_dataset
from captune.data.synthetic import make_synthetic
from captune.evaluate import evaluate
from captune.model import load_model_and_processor
from captune.train import eval_options, train


# The claims are relative (before vs after, best/ vs its reload): scored without Java, whose tokeniser and METEOR
# would start a JVM at each of the 7 validations (see conftest's no_java).
pytestmark = pytest.mark.usefixtures("no_java")


# Each family's tiny preset at its own learning rate (its family default); Florence-2's is cheaper a step.
@pytest.mark.parametrize("preset, epochs", [("tiny", 7), ("tiny-florence2", 7)])
def test_loss_falls_and_held_out_exact_match_rises(tmp_path, preset, epochs):
    data = make_synthetic(tmp_path / "data", n_train=640, n_val=50, seed=7)
    cfg = load_config(None, {
        "output": str(tmp_path / "run"), "data": {"path": str(data), "num_workers": 0}, "model": {"name": preset},
        "train": {"epochs": epochs, "batch_size": 16, "log_every_steps": 5},
        "eval": {"num_beams": 1, "max_new_tokens": 8, "min_new_tokens": 0, "batch_size": 50},
    })
    held_out = build_dataset(data).validation
    model, processor = load_model_and_processor(preset, seed=cfg.train.seed)
    before = evaluate(model, processor, held_out, eval_options(cfg), meteor=False)
    result = train(cfg, model=model, processor=processor)
    tuned, tuned_processor = load_model_and_processor(str(tmp_path / "run" / "best"))
    after = evaluate(tuned, tuned_processor, held_out, eval_options(cfg), meteor=False)

    losses = [r["loss"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if r["split"] == "train"]
    print("exact match before/after:", before.metrics["exact_match"], after.metrics["exact_match"], losses[0], losses[-1])
    assert losses[-1] < 0.3 * losses[0]
    assert before.metrics["exact_match"] <= 0.05
    assert after.metrics["exact_match"] >= 0.4, after.metrics
    assert after.metrics["cider"] > before.metrics["cider"] + 2.0
    # best/ is the checkpoint with the best validation CIDEr, and reloading it reproduces that score.
    assert abs(after.metrics["cider"] - result.best_score) < 1e-6
