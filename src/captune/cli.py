"""The `captune` command line: train, eval, caption, demo.

Every subcommand is a plain function of parsed arguments; `main(argv)` returns the exit code so tests call it directly.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import CaptuneError

log = logging.getLogger("captune")


def _generation_flags(parser: argparse.ArgumentParser, beams: int | None, min_tokens: int | None) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--num-beams", type=int, default=beams, help=f"beam width, 1 = greedy (default {beams or 'from the model dir, else 1'})")
    group.add_argument("--max-new-tokens", type=int, default=None, help="longest caption in tokens (default 30)")
    group.add_argument("--min-new-tokens", type=int, default=min_tokens, help="shortest caption in tokens (default 0)")
    group.add_argument("--prompt", default=None, help="caption prefix used in training (default: the model dir's captune.json, else none)")
    group.add_argument("--sample", action="store_true", help="nucleus sampling instead of greedy/beam search")
    group.add_argument("--top-p", type=float, default=0.9, help="nucleus mass when sampling (default 0.9)")
    group.add_argument("--temperature", type=float, default=1.0, help="temperature when sampling (default 1.0)")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats (default 1.0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captune", description="Fine-tune, evaluate and run BLIP image captioners on your own images."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="fine-tune a BLIP model on an image folder",
                                description="Fine-tune a BLIP model; writes config.yaml, metrics.jsonl, best/ and last/ in --output.")
    train.add_argument("--data", help="image folder with metadata.jsonl/metadata.csv (or train/ + validation/)")
    train.add_argument("--model", help="hub id, local model directory, or 'tiny' (default Salesforce/blip-image-captioning-base)")
    train.add_argument("--output", help="run directory (default runs/captune)")
    train.add_argument("--config", help="YAML recipe (see configs/); flags and --set override it")
    train.add_argument("--epochs", type=int)
    train.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    train.add_argument("--batch-size", type=_batch_size, help="pairs per process per step, or 'auto' (GPU: the largest that fits)")
    train.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--val-split", type=float, help="hold out this fraction of images when the data has no validation/ folder")
    train.add_argument("--prompt", help="caption prefix masked out of the loss (the COCO recipe uses 'a picture of ')")
    train.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"])
    train.add_argument("--seed", type=int)
    train.add_argument("--num-workers", type=int, help="DataLoader workers")
    train.add_argument("--eval-every", type=int, help="also validate every N optimizer steps")
    train.add_argument("--mode", choices=["full", "frozen-vision", "lora"], help="what trains (default full)")
    train.add_argument("--save-every", type=int, help="write a resumable checkpoint every N optimizer steps (and at each epoch end)")
    train.add_argument("--keep-last", type=int, help="keep the newest K checkpoints in RUN/checkpoints (default 2)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --output from its newest checkpoint (its config.yaml unless --config is given)")
    train.add_argument("--report-to", help="trackers besides metrics.jsonl: auto (TensorBoard if installed), none, "
                       "or a comma list of tensorboard, wandb, mlflow")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key, e.g. --set train.label_smoothing=0 (repeatable)")

    evaluate = commands.add_parser("eval", help="caption a dataset with a model and score it",
                                   description="Writes OUT/metrics.json (BLEU-1..4, METEOR, ROUGE-L, CIDEr, exact_match) and OUT/predictions.jsonl.")
    evaluate.add_argument("--model", required=True, help="model directory (e.g. RUN/best), hub id, or 'tiny'")
    evaluate.add_argument("--data", required=True, help="image folder with metadata")
    evaluate.add_argument("--output", required=True, help="directory for metrics.json and predictions.jsonl")
    evaluate.add_argument("--split", choices=["auto", "train", "validation"], default="auto",
                          help="which split to score; auto = validation/ when the folder has one, else all images")
    evaluate.add_argument("--batch-size", type=int, default=32, help="images per generation batch (default 32)")
    _generation_flags(evaluate, beams=None, min_tokens=None)

    caption = commands.add_parser("caption", help="caption image files, one line each",
                                  description="Print one caption per image, in the order given.")
    caption.add_argument("--model", required=True, help="model directory (e.g. RUN/best), hub id, or 'tiny'")
    caption.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    caption.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    _generation_flags(caption, beams=None, min_tokens=None)

    export = commands.add_parser("export", help="write a plain transformers model directory (LoRA merged in)",
                                 description="Exports RUN/best (or a model/adapter directory) as a directory that "
                                 "BlipForConditionalGeneration.from_pretrained loads without captune or peft.")
    export.add_argument("run", metavar="RUN", help="run directory (its best/ is exported) or model directory")
    export.add_argument("--output", required=True, help="directory to write")

    demo = commands.add_parser("demo", help="fine-tune the tiny model on the embedded synthetic shapes (offline, CPU)",
                               description="Makes the synthetic dataset, captions held-out images, fine-tunes the tiny "
                               "model, captions them again and prints before/after metrics. Writes RUN/demo.json.")
    demo.add_argument("--output", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--epochs", type=int, help="override the demo's epochs")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "caption":
            return cmd_caption(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "export":
            return cmd_export(args)
        raise AssertionError(args.command)
    except CaptuneError as exc:
        print(f"captune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("captune: interrupted", file=sys.stderr)
        return 130


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("captune")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("captune: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    import transformers

    # transformers' own warnings (e.g. generation config notes) drown ours; errors still show.
    transformers.logging.set_verbosity_error()


def train_overrides(args) -> dict:
    """Map explicit train flags onto the config tree (None = not given, leave the recipe's value)."""
    flags = {
        ("data", "path"): args.data, ("model", "name"): args.model, ("output",): args.output,
        ("train", "epochs"): args.epochs, ("train", "max_steps"): args.max_steps,
        ("train", "batch_size"): args.batch_size, ("train", "grad_accum"): args.grad_accum, ("train", "lr"): args.lr,
        ("data", "val_split"): args.val_split, ("data", "prompt"): args.prompt,
        ("train", "mixed_precision"): args.mixed_precision, ("train", "seed"): args.seed,
        ("data", "num_workers"): args.num_workers, ("train", "eval_every_steps"): args.eval_every,
        ("train", "mode"): args.mode, ("train", "save_every_steps"): args.save_every,
        ("train", "keep_last"): args.keep_last, ("train", "report_to"): args.report_to,
    }
    values: dict = {}
    for path, value in flags.items():
        if value is None:
            continue
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return values


def cmd_train(args) -> int:
    from .config import apply_override, from_dict, load_config, to_dict
    from .train import train

    recipe = args.config
    if args.resume and recipe is None:
        if not args.output:
            raise CaptuneError("--resume needs --output RUN (the run directory to continue)")
        saved = Path(args.output) / "config.yaml"
        recipe = saved if saved.is_file() else None  # a run killed before it wrote anything: flags alone
    cfg = load_config(recipe, train_overrides(args))
    values = to_dict(cfg)
    for assignment in args.set:
        apply_override(values, assignment)
    cfg = from_dict(values)
    if not cfg.data.path:
        raise CaptuneError("no data: pass --data DIR (an image folder with metadata.jsonl) or set data.path in --config")
    result = train(cfg, resume=args.resume)
    if result.interrupted:
        # A requested stop (SIGINT/SIGTERM, e.g. a preempted job) that saved its checkpoint is a clean exit.
        return 0
    log.info("done: %d steps; best %s %s at step %s; models in %s/best and %s/last", result.steps,
             cfg.train.best_metric, _fmt(result.best_score), result.best_step, result.output, result.output)
    return 0


def generation_options(args, model_dir_settings: dict):
    """Generation flags, falling back to what the model directory recorded at training time."""
    from .generate import GenerationOptions

    saved = model_dir_settings.get("generation", {})
    try:
        return GenerationOptions(
            num_beams=args.num_beams if args.num_beams is not None else saved.get("num_beams", 1),
            max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else saved.get("max_new_tokens", 30),
            min_new_tokens=args.min_new_tokens if args.min_new_tokens is not None else saved.get("min_new_tokens", 0),
            prompt=args.prompt if args.prompt is not None else model_dir_settings.get("prompt", ""),
            do_sample=args.sample, top_p=args.top_p, temperature=args.temperature,
            repetition_penalty=args.repetition_penalty,
        )
    except ValueError as exc:
        raise CaptuneError(f"generation options: {exc}") from exc


def cmd_eval(args) -> int:
    from .data import build_dataset
    from .evaluate import evaluate, write_json, write_jsonl
    from .model import load_captune_settings, load_model_and_processor

    data = build_dataset(args.data)
    if args.split == "validation" and not data.validation:
        raise CaptuneError(f"--split validation: {args.data} has no validation/ (or val/, test/) folder")
    samples = data.train if args.split == "train" else (data.validation or data.train)
    model, processor = load_model_and_processor(args.model)
    options = generation_options(args, load_captune_settings(args.model))
    result = evaluate(model, processor, samples, options, batch_size=args.batch_size)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "metrics.json", result.metrics)
    write_jsonl(output / "predictions.jsonl", result.predictions)
    print(format_metrics_table({"score": result.metrics}))
    log.info("wrote %s and %s", output / "metrics.json", output / "predictions.jsonl")
    return 0


def cmd_caption(args) -> int:
    from .data.records import load_rgb
    from .generate import caption_images
    from .model import load_captune_settings, load_model_and_processor

    images = [load_rgb(Path(path), origin=path) for path in args.images]
    model, processor = load_model_and_processor(args.model)
    model.eval()
    options = generation_options(args, load_captune_settings(args.model))
    for caption in caption_images(model, processor, images, options, batch_size=args.batch_size):
        print(caption)
    return 0


def cmd_export(args) -> int:
    from .checkpoint import export_merged

    output = export_merged(args.run, args.output)
    log.info("wrote %s (loads with BlipForConditionalGeneration.from_pretrained)", output)
    return 0


def _batch_size(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.output, epochs=args.epochs)
    return 0


METRIC_ORDER = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice", "exact_match")


def format_metrics_table(columns: dict[str, dict]) -> str:
    """A plain-text table: one row per metric, one column per named metrics dict."""
    names = list(columns)
    keys = [k for k in METRIC_ORDER if any(k in c for c in columns.values())]
    lines = [f"{'metric':<12}" + "".join(f"{n:>10}" for n in names)]
    for key in keys:
        lines.append(f"{key:<12}" + "".join(f"{_fmt(columns[n].get(key)):>10}" for n in names))
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
