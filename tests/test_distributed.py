"""Two CPU processes (gloo, torchrun) against one: same global batch, same loss curve; same evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import torchrun

from captune.cli import main
from captune.data import build_dataset
from captune.data.synthetic import make_synthetic
from captune.evaluate import evaluate
from captune.generate import GenerationOptions
from captune.model import load_model_and_processor

pytestmark = pytest.mark.slow
OPTIONS = GenerationOptions(num_beams=1, max_new_tokens=5, min_new_tokens=0)

EVAL_SCRIPT = """
import json, sys
from accelerate import Accelerator
from captune.data import build_dataset
from captune.evaluate import evaluate
from captune.generate import GenerationOptions
from captune.model import load_model_and_processor
from captune.train import settle_collectives

accelerator = Accelerator(cpu=True)
samples = build_dataset(sys.argv[1]).validation
model, processor = load_model_and_processor(sys.argv[2])
result = evaluate(model, processor, samples, GenerationOptions(num_beams=1, max_new_tokens=5, min_new_tokens=0),
                  accelerator=accelerator, batch_size=2, meteor=False)
if accelerator.is_main_process:
    json.dump({"processes": accelerator.num_processes, "metrics": result.metrics,
               "predictions": result.predictions}, open(sys.argv[3], "w"))
settle_collectives(accelerator)
"""


def train_args(data: Path, output: Path, batch_size: int, model: str = "tiny") -> list[str]:
    return ["train", "--data", str(data), "--model", model, "--output", str(output), "--max-steps", "3",
            "--batch-size", str(batch_size), "--lr", "1e-3", "--num-workers", "0", "--report-to", "none",
            "--save-every", "2", "--set", "train.log_every_steps=1", "--set", "train.warmup_ratio=0",
            "--set", "eval.num_beams=1", "--set", "eval.min_new_tokens=0", "--set", "eval.max_new_tokens=5"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    # 5 validation images: an uneven split across 2 processes, which gather_for_metrics must undo.
    return make_synthetic(tmp_path_factory.mktemp("data"), n_train=24, n_val=5)


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("single") / "run"
    with pytest.MonkeyPatch.context() as patch:
        # The Java-less scorer: no test reads this run's metrics, and under Java its validations would start the
        # PTB tokeniser's JVM and, at the end, METEOR's (~10 s).
        patch.setattr("captune.metrics.shutil.which", lambda name: None)
        assert main(["-q"] + train_args(data_dir, output, batch_size=8)) == 0
    return output


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_two_processes_batch_4_follow_one_process_batch_8(data_dir, single, tmp_path):
    """Also kills "DDP never all-reduces gradients" (tools/mutants.py) by its final weights: each process stepping
    on its own half-batch gradients leaves rank 0's weights as far from the one-process run's as training moved
    them, whatever the logged (all-reduced) losses say."""
    output = tmp_path / "run"
    # Checkpoints kept (a clean finish removes them by default), the step-2 one beside the final step-3 one.
    torchrun(["-m", "captune", "-q"] + train_args(data_dir, output, batch_size=4)
             + ["--keep-checkpoints", "--keep-last", "2"])
    one, two = losses(single), losses(output)
    assert len(one) == len(two) == 3  # one writer: no line twice
    # Same samples in each global batch; the per-process token means differ slightly from the global mean.
    assert two == pytest.approx(one, rel=2e-3)
    # Only the main process writes; every process saved its RNG state into the one checkpoint.
    assert {p.name for p in (output / "checkpoints" / "step-00000002").glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    assert (output / "last" / "model.safetensors").is_file()
    import torch

    start = load_model_and_processor("tiny", seed=42)[0].state_dict()  # train.seed's random init
    trained_one, trained_two = weights(single / "last"), weights(output / "last")
    moved = torch.sqrt(sum(((trained_one[k] - start[k]) ** 2).sum() for k in trained_one))
    apart = torch.sqrt(sum(((trained_two[k] - trained_one[k]) ** 2).sum() for k in trained_one))
    assert moved > 0 and apart < 0.01 * moved, (apart.item(), moved.item())


def without_dropout(preset: str, path: Path) -> Path:
    """`preset` saved to `path` with every dropout probability 0: ranks draw other dropout masks than one process
    does (tiny BLIP has none; tiny BLIP-2's Q-Former and tiny GIT's text stack have p=0.1), which would blur the
    comparison below."""
    from transformers import PretrainedConfig

    model, processor = load_model_and_processor(preset, seed=42)
    configs = [model.config]
    while configs:
        config = configs.pop()
        for key, value in vars(config).items():
            if isinstance(value, PretrainedConfig):
                configs.append(value)
            elif "dropout" in key and isinstance(value, float):
                setattr(config, key, 0.0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.mark.parametrize("preset", ["tiny-blip2", "tiny-git", "tiny-florence2", "tiny-paligemma", "tiny-smolvlm"])
def test_other_families_train_under_two_processes_as_under_one(preset, tmp_path):
    """BLIP-2 (from a directory: its default mode freezes the language model, so DDP meets frozen parameters) and
    GIT (image tokens inside the text sequence) under torchrun: the loss is the global token mean and rank 0's final
    weights equal the one-process run's. Training data only: distributed evaluation is the family-agnostic
    gather_for_metrics tested above with BLIP. Kills "DDP never all-reduces gradients (BLIP-2, GIT)"
    (tools/mutants.py) by the final weights."""
    data = make_synthetic(tmp_path / "data", n_train=24, n_val=0)
    base = without_dropout(preset, tmp_path / "base")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["-q"] + train_args(data, one, batch_size=8, model=str(base))) == 0
    torchrun(["-m", "captune", "-q"] + train_args(data, two, batch_size=4, model=str(base)))
    assert len(losses(one)) == 3 and losses(two) == pytest.approx(losses(one), rel=2e-3)
    import torch

    start = weights(base)
    trained_one, trained_two = weights(one / "last"), weights(two / "last")
    moved = torch.sqrt(sum(((trained_one[k] - start[k]) ** 2).sum() for k in trained_one))
    apart = torch.sqrt(sum(((trained_two[k] - trained_one[k]) ** 2).sum() for k in trained_one))
    assert moved > 0 and apart < 0.01 * moved, (apart.item(), moved.item())


def test_distributed_evaluation_equals_single_process(data_dir, single, tmp_path):
    script = tmp_path / "evaluate_two.py"
    script.write_text(EVAL_SCRIPT)
    out = tmp_path / "two.json"
    torchrun([str(script), str(data_dir), str(single / "last"), str(out)])
    two = json.loads(out.read_text())
    assert two["processes"] == 2
    model, processor = load_model_and_processor(str(single / "last"))
    one = evaluate(model, processor, build_dataset(data_dir).validation, OPTIONS, batch_size=2, meteor=False)
    assert two["predictions"] == one.predictions
    assert two["metrics"] == pytest.approx(one.metrics)


def test_uneven_streamed_shards_with_a_bad_sample_finish_every_epoch(tmp_path):
    """Rank 0 streams 6 pairs, rank 1 three (one undecodable): padding evens the steps out, an all-padding batch
    still takes part in the all-reduce, and accumulation steps on each epoch's last partial window."""
    from datafiles import tar_shards

    tar_shards(tmp_path / "shards", 1, 5, extra={"broken.jpg": b"not a jpeg", "broken.txt": b"a broken one"})
    run = tmp_path / "run"
    torchrun(["-m", "captune", "-q", "train", "--data", str(tmp_path / "shards"), "--model", "tiny", "--output",
              str(run), "--epochs", "2", "--batch-size", "2", "--grad-accum", "2", "--num-workers", "0",
              "--report-to", "none", "--set", "train.log_every_steps=1"], timeout=240)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["split"] == "train"] == [0, 0, 1, 1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and [s["id"] for s in summary["skipped_samples"]] == ["broken"]
