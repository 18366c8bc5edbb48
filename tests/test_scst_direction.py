"""SCST beats continued cross-entropy on held-out CIDEr where cross-entropy plateaus: a small, seeded version of
benchmarks/scst_synthetic.py (its docstring describes the task), run through the benchmark's own `run()`.

The claim is the direction, not a score: from the same cross-entropy model, which gives every image the generic
caption (CIDEr-D 0), N SCST steps end above N more cross-entropy steps. The small configuration was checked on seeds
0, 1 and 2 (see the test); the benchmark's full-size numbers for three seeds are in the README and RESULTS.md.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from captune.data import load_rgb

# In-process runs compared with each other: CIDEr with captune's Java-less tokeniser (equal to PTB's on these lowercase
# captions), no METEOR start at each stage's final validation.
pytestmark = pytest.mark.usefixtures("no_java")

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "scst_synthetic.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("scst_synthetic", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # three short tiny-model trainings (~30 CPU-seconds): the claim needs a cross-entropy plateau first
def test_scst_beats_continued_cross_entropy_on_held_out_cider(tmp_path):
    """Seeded; this configuration was run for seeds 0, 1 and 2: SCST 0.281, 1.041, 0.255 held-out CIDEr against
    0.000 for continued cross-entropy each time, whose captions were all generic."""
    bench = load_benchmark()
    # Both arms at the same learning rate, from the same cross-entropy model, for the same number of steps.
    result = bench.run(
        tmp_path, seed=0, n_train=200, n_val=16, ce_steps=120, steps=12, ce_lr=1e-3, lr=1e-3, scst_lr=1e-3,
        batch_size=16, scst_batch_size=8, samples=5, validate_at_end_only=True)

    def captions(stage: str) -> list[str]:
        lines = (tmp_path / stage / "val_predictions.jsonl").read_text().splitlines()
        return [json.loads(line)["prediction"] for line in lines]

    # The plateau: continued cross-entropy gives every held-out image a generic caption (CIDEr-D 0).
    assert all(caption in bench.GENERIC for caption in captions("ce_more")), captions("ce_more")
    # SCST, from the same model for as many steps, says what is in the picture and scores higher.
    assert sum(caption in bench.GENERIC for caption in captions("scst")) < 16 // 2, captions("scst")
    assert result["scst"]["cider"] > result["ce_more"]["cider"], result

def test_the_task_is_the_synthetic_shapes_with_generic_references_added(tmp_path):
    """The benchmark's data is captune's synthetic folder (same scenes for the same seed), each image's references its
    own caption twice, then the generic captions; the folder a user gets by default keeps one caption an image."""
    from captune.data import build_dataset
    from captune.data.synthetic import make_synthetic

    bench = load_benchmark()
    task = build_dataset(str(bench.make_task(tmp_path / "task", 6, 2, seed=4)))
    plain = build_dataset(str(make_synthetic(tmp_path / "plain", 6, 2, seed=4)))
    for split in ("train", "validation"):
        for with_generic, alone in zip(getattr(task, split), getattr(plain, split), strict=True):
            assert len(alone.captions) == 1
            assert list(with_generic.captions) == [alone.captions[0]] * 2 + list(bench.GENERIC)
            assert load_rgb(with_generic.image, with_generic.origin).tobytes() == \
                load_rgb(alone.image, alone.origin).tobytes()
