"""The `captune` command line: train, eval, caption, report, demo.

Every subcommand is a plain function of parsed arguments; `main(argv)` returns the exit code so tests call it directly.
"""

from __future__ import annotations

import argparse
import logging
import os
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
    _guard_flags(group, "the model dir's captune.json, else ")


def _guard_flags(group, default: str) -> None:
    """Decoding options against repeated words, shared by caption/eval/serve (defaults from captune.json) and train
    (recorded into captune.json)."""
    group.add_argument("--repetition-penalty", type=float, default=None,
                       help=f">1 discourages tokens already in the caption (default {default}1.0 = off)")
    group.add_argument("--no-repeat-ngram-size", type=int, default=None,
                       help=f"forbid any token n-gram of this size from repeating, e.g. 3 (default {default}0 = off)")
    group.add_argument("--length-penalty", type=float, default=None,
                       help=f"beam search: >1 favours longer captions, <1 shorter (default {default}1.0)")


def _data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data source")
    group.add_argument("--data-format", choices=["auto", "folder", "sidecar", "coco", "karpathy", "hf", "webdataset"],
                       help="force the reader (default auto: told from the path)")
    group.add_argument("--image-root", help="COCO/Karpathy: folder the image file names are relative to")
    group.add_argument("--image-column", help="Hugging Face datasets: image column")
    group.add_argument("--caption-column", help="Hugging Face datasets: caption column")
    group.add_argument("--train-split", help="Hugging Face datasets: split to train on (default train)")
    group.add_argument("--eval-split", help="Hugging Face datasets: held-out split (default validation/val/test)")


INT8_HELP = ("CPU only: dynamic int8 quantization of the Linear layers (about 2x faster captioning on a CPU); "
             "captions can differ slightly from fp32 ones (see docs/serving.md)")


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
    _data_flags(train)
    train.add_argument("--on-bad-sample", choices=["skip", "error"],
                       help="corrupt image, missing file, empty caption: skip it (counted in summary.json, the "
                       "default) or stop")
    train.add_argument("--caption-sampling", choices=["all", "random", "grouped"],
                       help="several captions per image: every pair per epoch (default), one drawn at random, or "
                            "every pair with an image's captions batched together so its ViT pass is shared")
    train.add_argument("--mode", choices=["full", "frozen-vision", "frozen-lm", "lora"],
                       help="what trains (default: the model family's; full, BLIP-2 frozen-lm)")
    train.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile the training forward (dynamic shapes; minutes to compile, then faster)")
    train.add_argument("--save-every", type=int, help="write a resumable checkpoint every N optimizer steps (and at each epoch end)")
    train.add_argument("--keep-last", type=int, help="keep the newest K checkpoints in RUN/checkpoints (default 2)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --output from its newest checkpoint (its config.yaml unless --config is given)")
    train.add_argument("--overwrite", action="store_true",
                       help="start afresh in an --output that already holds a run (its checkpoints, best/ and last/ "
                       "are replaced); without it, or --resume, such a directory is refused")
    train.add_argument("--report-to", help="trackers besides metrics.jsonl: auto (TensorBoard if installed), none, "
                       "or a comma list of tensorboard, wandb, mlflow")
    train.add_argument("--objective", choices=["ce", "scst"],
                       help="ce: cross-entropy on the references (default); scst: self-critical sequence training, "
                       "a second stage from a cross-entropy model (--model RUN/best) that optimises CIDEr-D")
    train.add_argument("--scst-samples", type=int, help="SCST: captions sampled per image (default 5)")
    train.add_argument("--scst-baseline", choices=["mean", "greedy"],
                       help="SCST: reward baseline, the mean of the image's other samples (default) or the greedy "
                       "caption's")
    _guard_flags(train.add_argument_group("validation decoding (recorded in captune.json)"), "")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key, e.g. --set train.label_smoothing=0 (repeatable)")

    evaluate = commands.add_parser(
        "eval", help="caption a dataset with one or more models and score them",
        description="Writes OUT/metrics.json (BLEU-1..4, METEOR, ROUGE-L, CIDEr, exact_match) and OUT/predictions.jsonl "
        "(per image: prediction, references, CIDEr, BLEU-4). With several --model, metrics.json maps each model to its "
        "metrics and each predictions line holds a `models` object, one entry per model. Runs on every process under "
        "torchrun / accelerate launch.")
    evaluate.add_argument("--model", required=True, action="append",
                          help="run directory (its best/ is used), model directory, hub id, or 'tiny'; "
                          "repeat to compare models, e.g. --model tiny --model runs/x")
    evaluate.add_argument("--data", required=True, help="image folder with metadata")
    evaluate.add_argument("--output", required=True, help="directory for metrics.json and predictions.jsonl")
    evaluate.add_argument("--split", choices=["auto", "train", "validation", "test"], default="auto",
                          help="which split to score; auto = the validation split when the data has one, else all "
                          "images; test = a Karpathy file's test split")
    _data_flags(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=32, help="images per generation batch (default 32)")
    evaluate.add_argument("--int8", action="store_true", help=INT8_HELP)
    _generation_flags(evaluate, beams=None, min_tokens=None)

    check = commands.add_parser("check", help="check a dataset before training: counts, lengths, every problem",
                                description="Read every image and caption as training will; list each problem with "
                                "its file (and line). Exit 0 when clean, 1 when it found errors.")
    check.add_argument("data", metavar="DATA", help="dataset: folder, COCO/Karpathy .json, .tar shards, or HF dataset")
    _data_flags(check)
    check.add_argument("--model", default="tiny", help="count caption tokens as this model trains on them: a preset "
                       "(e.g. tiny-florence2), a model directory or a cached hub id (default tiny, BLIP's tokenizer)")
    check.add_argument("--max-caption-tokens", type=int, default=None,
                       help="count captions longer than this many tokens (default: the model family's "
                       "data.max_caption_tokens, as training)")
    check.add_argument("--prompt", default="", help="caption prefix used in training (counts toward the length)")
    check.add_argument("--max-image-pixels", type=int, default=None, help="refuse larger images (default 100M)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")

    caption = commands.add_parser(
        "caption", help="caption image files, folders or globs, one line each",
        description="Print one caption per image, in the order given (folders recursively, sorted). Unreadable files "
        "are reported on stderr and skipped; the exit code is 1 if any input failed, 0 if all were captioned.")
    caption.add_argument("--model", required=True, help="model directory (e.g. RUN/best), LoRA adapter dir, hub id, or 'tiny'")
    caption.add_argument("images", nargs="+", metavar="IMAGE", help="image files, directories (recursive) or quoted globs")
    caption.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    caption.add_argument("--format", choices=["text", "tsv", "jsonl", "csv", "sidecar"], default="text",
                         help="text: one caption a line (default); tsv: path<TAB>caption; jsonl: {path, caption}; "
                         "csv: path,caption with header; sidecar: IMAGE.txt beside each image")
    caption.add_argument("--output", help="write text/tsv/jsonl/csv here instead of stdout (replaced only when done)")
    caption.add_argument("--ext", help="extensions taken from directories and globs (default jpg,jpeg,png,webp,bmp,gif,tif,tiff)")
    caption.add_argument("--overwrite", action="store_true", help="with --format sidecar, replace existing .txt files")
    caption.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available, cpu with --int8)")
    caption.add_argument("--int8", action="store_true", help=INT8_HELP)
    _generation_flags(caption, beams=None, min_tokens=None)

    serve = commands.add_parser(
        "serve", help="web page and JSON API that caption uploaded images",
        description="Serve a captioner: a web page at /, the JSON API at POST /v1/caption, /openapi.json, "
        "/health and /stats. Concurrent requests are batched on the model.")
    serve.add_argument("--model", required=True, help="model directory (e.g. RUN/best), LoRA adapter dir, hub id, or 'tiny'")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    serve.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available, cpu with --int8)")
    serve.add_argument("--int8", action="store_true", help=INT8_HELP)
    serve.add_argument("--max-batch-size", type=int, default=16, help="images per generate() call (default 16)")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to gather requests into a batch (default 5)")
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body in MB (default 20)")
    serve.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image in pixels (default 40M)")
    serve.add_argument("--max-images", type=int, default=16, help="most images in one request (default 16)")
    serve.add_argument("--read-timeout", type=float, default=10.0,
                       help="seconds a client has to send its headers, and each piece of its body (default 10)")
    serve.add_argument("--max-connections", type=int, default=256,
                       help="open connections; past it new ones get 503 at once (default 256)")
    _guard_flags(serve.add_argument_group("generation defaults"), "the model dir's captune.json, else ")

    report = commands.add_parser("report", help="rebuild RUN/report.html from a run directory",
                                 description="Rebuild the self-contained RUN/report.html and RUN/plots/ from the files "
                                 "training wrote (config.yaml, metrics.jsonl, summary.json, val_predictions*.jsonl).")
    report.add_argument("run", metavar="RUN", help="run directory (the --output of `captune train`)")

    export = commands.add_parser("export", help="write a plain transformers model directory (LoRA merged in)",
                                 description="Exports RUN/best (or a model/adapter directory) as a directory that "
                                 "BlipForConditionalGeneration.from_pretrained loads without captune or peft.")
    export.add_argument("run", metavar="RUN", help="run directory (its best/ is exported) or model directory")
    export.add_argument("--output", required=True, help="directory to write (new or empty)")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export (a model directory) at --output")

    demo = commands.add_parser("demo", help="fine-tune the tiny model on the embedded synthetic shapes (offline, CPU)",
                               description="Makes the synthetic dataset, captions held-out images, fine-tunes the tiny "
                               "model, captions them again and prints before/after metrics. Writes RUN/demo.json.")
    demo.add_argument("--output", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--epochs", type=int, help="override the demo's epochs")
    demo.add_argument("--model", default="tiny", help="the tiny preset to fine-tune (default tiny, BLIP; e.g. "
                      "tiny-florence2)")
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
        if args.command == "check":
            return cmd_check(args)
        if args.command == "caption":
            return cmd_caption(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "report":
            return cmd_report(args)
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
    except Exception as exc:  # a bug or an unforeseen input: one line for the user, the traceback on request
        if os.environ.get("CAPTUNE_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"captune: error: unexpected {type(exc).__name__}: {first} (set CAPTUNE_DEBUG=1 for the traceback "
              "and please report it)", file=sys.stderr)
        return 1


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("captune")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("captune: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    # Point at the current stderr on every call: main() may run many times in one process (tests, notebooks).
    logger.handlers[0].stream = sys.stderr
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    import transformers

    # transformers' own warnings (e.g. generation config notes) drown ours; errors still show. Its per-load
    # "Loading weights" / "Writing model shards" bars are noise next to ours (Hub download bars are kept).
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def train_overrides(args) -> dict:
    """Map explicit train flags onto the config tree (None = not given, leave the recipe's value)."""
    flags = {
        ("data", "path"): args.data, ("model", "name"): args.model, ("output",): args.output,
        ("train", "epochs"): args.epochs, ("train", "max_steps"): args.max_steps,
        ("train", "batch_size"): args.batch_size, ("train", "grad_accum"): args.grad_accum, ("train", "lr"): args.lr,
        ("data", "val_split"): args.val_split, ("data", "prompt"): args.prompt,
        ("train", "mixed_precision"): args.mixed_precision, ("train", "seed"): args.seed,
        ("data", "num_workers"): args.num_workers, ("train", "eval_every_steps"): args.eval_every,
        ("data", "format"): args.data_format, ("data", "image_root"): args.image_root,
        ("data", "image_column"): args.image_column, ("data", "caption_column"): args.caption_column,
        ("data", "train_split"): args.train_split, ("data", "eval_split"): args.eval_split,
        ("data", "on_bad_sample"): args.on_bad_sample, ("data", "caption_sampling"): args.caption_sampling,
        ("train", "mode"): args.mode, ("train", "save_every_steps"): args.save_every,
        ("train", "keep_last"): args.keep_last, ("train", "report_to"): args.report_to,
        ("train", "compile"): args.compile, ("train", "objective"): args.objective,
        ("train", "scst_samples"): args.scst_samples, ("train", "scst_baseline"): args.scst_baseline,
        ("eval", "repetition_penalty"): args.repetition_penalty,
        ("eval", "no_repeat_ngram_size"): args.no_repeat_ngram_size, ("eval", "length_penalty"): args.length_penalty,
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
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
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
            **{name: getattr(args, name) if getattr(args, name) is not None else saved.get(name, default)
               for name, default in (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0),
                                     ("length_penalty", 1.0))},
        )
    except ValueError as exc:
        raise CaptuneError(f"generation options: {exc}") from exc


def resolve_model(name: str) -> str:
    """A run directory stands for its best/ model; anything else (model dir, adapter dir, hub id, tiny) as given."""
    from .checkpoint import restore_interrupted_swap

    path = Path(name).expanduser()
    if path.is_dir():
        restore_interrupted_swap(path / "best")  # a run killed mid-swap left its previous best/ aside
    if path.is_dir() and (path / "best").is_dir() and not any(
        (path / marker).is_file() for marker in ("config.json", "adapter_config.json")
    ):
        return str(path / "best")
    return name


def model_labels(names: list[str]) -> list[str]:
    """Column names for the compared models: as typed, with #2, #3 appended to repeats."""
    labels: list[str] = []
    for name in names:
        label, n = name, 1
        while label in labels:
            n += 1
            label = f"{name}#{n}"
        labels.append(label)
    return labels


def cmd_eval(args) -> int:
    import torch
    from accelerate import Accelerator

    from .data import Shards, build_dataset
    from .evaluate import evaluate, merge_predictions
    from .files import write_json, write_jsonl
    from .metrics import format_metrics_table, guard_warnings
    from .model import load_captune_settings, load_model_and_processor
    from .speed import quantize_int8

    data = build_dataset(
        args.data, data_format=args.data_format or "auto", image_root=args.image_root or "",
        image_column=args.image_column or "", caption_column=args.caption_column or "",
        train_split=args.train_split or "train", eval_split=args.eval_split or "",
        strict=False, require_train=False,  # bad rows are skipped as training skips them, and named
    )
    for problem in data.problems:
        log.warning("skipped %s", problem)
    splits = {"train": data.train, "validation": data.validation, "test": data.test}
    samples = (data.validation or data.train) if args.split == "auto" else splits[args.split]
    if not samples:
        raise CaptuneError(f"--split {args.split}: {args.data} has no {args.split} split")
    if isinstance(samples, Shards):
        raise CaptuneError(f"{args.data}: tar shards are streamed for training only; evaluate on a folder, COCO or "
                           "datasets copy of the held-out images")
    # Under torchrun / accelerate launch each process captions a shard; evaluate() gathers them. cpu=True on a
    # CUDA-less machine: without it Accelerate ignores torchrun's WORLD_SIZE there and every process runs alone.
    # --int8 is a CPU lever (int8 kernels exist for CPUs only): it keeps every process on the CPU even next to a GPU.
    accelerator = Accelerator(cpu=args.int8 or not torch.cuda.is_available())
    results = {}
    for label, name in zip(model_labels(args.model), args.model):
        path = resolve_model(name)
        options = generation_options(args, load_captune_settings(path))  # before loading: bad flags fail fast
        model, processor = load_model_and_processor(path)
        model.to(accelerator.device)
        if args.int8:
            quantize_int8(model)
        results[label] = evaluate(model, processor, samples, options, accelerator=accelerator,
                                  batch_size=args.batch_size, desc=f"captioning with {label}")
        del model  # one model in memory at a time
    if accelerator.is_main_process:
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        if len(results) == 1:  # the documented single-model format: {bleu_1: ..., ...}, one prediction per line
            (result,) = results.values()
            write_json(output / "metrics.json", result.metrics)
            write_jsonl(output / "predictions.jsonl", result.predictions)
        else:
            write_json(output / "metrics.json", {label: r.metrics for label, r in results.items()})
            write_jsonl(output / "predictions.jsonl", merge_predictions({k: r.predictions for k, r in results.items()}))
        print(format_metrics_table({label: r.metrics for label, r in results.items()}))
        for label, result in results.items():
            for warning in guard_warnings(result.metrics, images=len(result.predictions)):
                log.warning("%s: %s", label, warning)
        log.info("wrote %s and %s", output / "metrics.json", output / "predictions.jsonl")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    path = write_report(args.run)
    log.info("wrote %s", path)
    return 0


def cmd_check(args) -> int:
    import json

    from .data.records import DEFAULT_MAX_PIXELS
    from .data.validate import check_dataset, format_report
    from .models import family_defaults

    report = check_dataset(
        args.data, data_format=args.data_format or "auto", image_root=args.image_root or "",
        image_column=args.image_column or "", caption_column=args.caption_column or "",
        train_split=args.train_split or "train", eval_split=args.eval_split or "",
        max_caption_tokens=args.max_caption_tokens or family_defaults(args.model)["data.max_caption_tokens"],
        prompt=args.prompt, max_image_pixels=args.max_image_pixels or DEFAULT_MAX_PIXELS, model=args.model,
    )
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report))
    return 1 if report["errors"] else 0


def cmd_caption(args) -> int:
    from .caption_files import parse_extensions, run_caption
    from .captioner import Captioner
    from .model import load_captune_settings

    if args.batch_size < 1:
        raise CaptuneError(f"--batch-size must be >= 1, got {args.batch_size}")
    extensions = parse_extensions(args.ext)
    options = generation_options(args, load_captune_settings(args.model))
    captioner = Captioner.load(args.model, device=args.device, int8=args.int8)
    return run_caption(captioner, args.images, options, fmt=args.format, output=args.output, extensions=extensions,
                       overwrite=args.overwrite, batch_size=args.batch_size, progress=not args.quiet)


def cmd_serve(args) -> int:
    from .captioner import Captioner

    try:
        from .serve import ServeLimits, run_server
    except ImportError as exc:
        raise CaptuneError(f"captune serve needs the serve extra ({exc.name} is missing): pip install 'captune[serve]'") from exc

    try:
        limits = ServeLimits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                             max_images=args.max_images, max_batch_size=args.max_batch_size,
                             batch_wait_s=args.batch_wait_ms / 1000, read_timeout_s=args.read_timeout,
                             max_connections=args.max_connections)
    except ValueError as exc:
        raise CaptuneError(f"serve limits: {exc}") from exc
    defaults = {name: getattr(args, name) for name in ("repetition_penalty", "no_repeat_ngram_size", "length_penalty")
                if getattr(args, name) is not None}
    captioner = Captioner.load(args.model, device=args.device, int8=args.int8, **defaults)
    run_server(captioner, host=args.host, port=args.port, limits=limits)
    return 0


def cmd_export(args) -> int:
    from .checkpoint import export_merged

    output = export_merged(args.run, args.output, overwrite=args.overwrite)
    log.info("wrote %s (loads with transformers' from_pretrained, no captune or peft needed)", output)
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

    run_demo(args.output, epochs=args.epochs, model=args.model)
    return 0


def _fmt(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # counts (vocabulary)
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
