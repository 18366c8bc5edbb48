"""SCST against continued cross-entropy on a synthetic task where cross-entropy plateaus below perfect.

The task: captune's synthetic shapes ("two red triangles"), each image with 5 references: its own caption twice and
the same three *generic* captions every image has ("a picture of shapes", "a drawing of shapes", "a picture of some
shapes"), as real caption sets mix informative and uninformative captions. Cross-entropy imitates the references: it
learns that a caption starts with "a" 60% of the time and with a count word 40%, so greedy decoding of a trained model
says "a picture of shapes" for every image, however long it trains. CIDEr-D weights n-grams by rarity: the generic
n-grams occur in every image's references, so they score 0, and only the specific caption earns anything. SCST
optimises that score directly, so it learns to lead with the count.

Three stages on the tiny preset, all through `captune.train.train`:
    1. cross-entropy for --ce-steps from the random tiny model              -> RUN/ce
    2a. from RUN/ce/last: --steps more cross-entropy steps                   -> RUN/ce_more
    2b. from RUN/ce/last: --steps SCST steps (k samples, mean baseline)      -> RUN/scst
and prints held-out CIDEr (pycocoevalcap, greedy decoding) of each, plus the ratio SCST / continued cross-entropy.

    PYTHONPATH=src python benchmarks/scst_synthetic.py --output runs/scst_bench --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from captune.config import load_config  # noqa: E402
from captune.data.synthetic import make_synthetic  # noqa: E402
from captune.train import train  # noqa: E402

GENERIC = ("a picture of shapes", "a drawing of shapes", "a picture of some shapes")


def make_task(root: Path, n_train: int, n_val: int, seed: int, specific: int = 2) -> Path:
    """Write the imagefolder (train/, validation/): each image's caption `specific` times, then GENERIC."""
    return make_synthetic(root, n_train, n_val, seed, caption_copies=specific, generic_captions=GENERIC)


def stage(output: Path, data: Path, model: str, steps: int, seed: int, lr: float, objective: str, batch_size: int,
          samples: int, eval_every: int = 0) -> dict:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", {
        "output": str(output), "model": {"name": model}, "data": {"path": str(data)},
        "train": {"max_steps": steps, "lr": lr, "seed": seed, "batch_size": batch_size, "objective": objective,
                  "scst_samples": samples, "report_to": "none", "log_every_steps": 5, "eval_every_steps": eval_every,
                  "warmup_ratio": 0.0 if objective == "scst" else 0.05},
        "eval": {"caption_before": False, "max_new_tokens": 8},
    })
    started = time.perf_counter()
    result = train(cfg)
    metrics = result.final_metrics
    return {"cider": metrics["cider"], "bleu_4": metrics["bleu_4"], "exact_match": metrics["exact_match"],
            "distinct_captions": metrics["distinct_captions"], "seconds": round(time.perf_counter() - started, 1)}


def run(output: Path, *, seed: int, n_train: int, n_val: int, ce_steps: int, steps: int, ce_lr: float, lr: float,
        scst_lr: float, batch_size: int, scst_batch_size: int, samples: int, validate_at_end_only: bool = False) -> dict:
    """The three stages; tests/test_scst_direction.py runs a small version (`validate_at_end_only`: one validation
    per stage, the held-out score compared, instead of one per epoch as well)."""
    data = make_task(output / "data", n_train, n_val, seed)
    results = {"seed": seed, "n_train": n_train, "n_val": n_val, "ce_steps": ce_steps, "steps": steps,
               "samples": samples}
    results["ce"] = stage(output / "ce", data, "tiny", ce_steps, seed, ce_lr, "ce", batch_size, samples,
                          eval_every=ce_steps if validate_at_end_only else 0)
    start = str(output / "ce" / "last")
    stage_two = steps if validate_at_end_only else 0
    results["ce_more"] = stage(output / "ce_more", data, start, steps, seed, lr, "ce", batch_size, samples,
                               eval_every=stage_two)
    results["scst"] = stage(output / "scst", data, start, steps, seed, scst_lr, "scst", scst_batch_size, samples,
                            eval_every=stage_two)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/scst_bench"))
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-val", type=int, default=60)
    parser.add_argument("--ce-steps", type=int, default=150, help="stage 1 cross-entropy steps (default 150)")
    parser.add_argument("--steps", type=int, default=40, help="stage 2 steps, for both arms (default 40)")
    parser.add_argument("--ce-lr", type=float, default=1e-3)
    parser.add_argument("--lr", type=float, default=3e-4, help="continued cross-entropy lr (default 3e-4)")
    parser.add_argument("--scst-lr", type=float, default=3e-4, help="SCST lr (default 3e-4, as --lr)")
    parser.add_argument("--batch-size", type=int, default=16, help="cross-entropy pairs per step (default 16)")
    parser.add_argument("--scst-batch-size", type=int, default=16, help="SCST images per step (default 16)")
    parser.add_argument("--samples", type=int, default=5, help="SCST samples per image (default 5)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for seed in args.seed:
        rows.append(run(args.output / f"seed{seed}", seed=seed, n_train=args.n_train, n_val=args.n_val,
                        ce_steps=args.ce_steps, steps=args.steps, ce_lr=args.ce_lr, lr=args.lr, scst_lr=args.scst_lr,
                        batch_size=args.batch_size, scst_batch_size=args.scst_batch_size, samples=args.samples))
    print(f"| seed | CE {args.ce_steps} steps | + {args.steps} CE | + {args.steps} SCST | "
          "SCST - CE |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['seed']} | {r['ce']['cider']:.3f} | {r['ce_more']['cider']:.3f} | {r['scst']['cider']:.3f} | "
              f"{r['scst']['cider'] - r['ce_more']['cider']:+.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
