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


def _global_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    """-q/-v on the top parser and again on every subcommand, so `captune caption ... -q` works as documented.

    On subcommands the default is SUPPRESS: a flag not repeated there leaves the top-level value alone.
    """
    default = {} if top else {"default": argparse.SUPPRESS}
    group = parser.add_argument_group("global options (anywhere on the line)") if not top else parser
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr", **default)
    group.add_argument("-v", "--verbose", action="store_true",
                       help="debug messages, and transformers' own warnings", **default)


def _trainer_alias(*names: str) -> list[str]:
    """Hugging Face Trainer's spellings of a flag, with dashes and with underscores (HfArgumentParser takes both)."""
    return list(dict.fromkeys(f"--{spelling}" for name in names for spelling in (name, name.replace("-", "_"))))


TRAIN_FLAGS = {
    "data": ("data", "path"), "model": ("model", "name"), "output": ("output",),
    "epochs": ("train", "epochs"), "max_steps": ("train", "max_steps"), "batch_size": ("train", "batch_size"),
    "grad_accum": ("train", "grad_accum"), "lr": ("train", "lr"), "weight_decay": ("train", "weight_decay"),
    "warmup_ratio": ("train", "warmup_ratio"), "val_split": ("data", "val_split"), "prompt": ("data", "prompt"),
    "mixed_precision": ("train", "mixed_precision"), "seed": ("train", "seed"), "num_workers": ("data", "num_workers"),
    "eval_every": ("train", "eval_every_steps"), "eval_every_epochs": ("train", "eval_every_epochs"),
    "log_every": ("train", "log_every_steps"),
    "data_format": ("data", "format"), "image_root": ("data", "image_root"), "image_column": ("data", "image_column"),
    "caption_column": ("data", "caption_column"), "train_split": ("data", "train_split"),
    "eval_split": ("data", "eval_split"), "on_bad_sample": ("data", "on_bad_sample"),
    "caption_sampling": ("data", "caption_sampling"), "mode": ("train", "mode"),
    "save_every": ("train", "save_every_steps"), "keep_last": ("train", "keep_last"),
    "keep_checkpoints": ("train", "keep_checkpoints"), "report_to": ("train", "report_to"),
    "compile": ("train", "compile"), "objective": ("train", "objective"), "scst_samples": ("train", "scst_samples"),
    "scst_baseline": ("train", "scst_baseline"), "repetition_penalty": ("eval", "repetition_penalty"),
    "no_repeat_ngram_size": ("eval", "no_repeat_ngram_size"), "length_penalty": ("eval", "length_penalty"),
}
"""`captune train` flag (argparse dest) -> the config key it sets; `--help` shows each key's default from here."""


def _show_config_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: X, KEY)" to every train flag's help, X read from the config dataclasses themselves."""
    from .config import Config, to_dict
    from .model import DEFAULT_MODEL
    from .models import family_defaults

    defaults = to_dict(Config())
    by_family = family_defaults(DEFAULT_MODEL)  # keys left unset (None) in the config take the model family's value
    for action in parser._actions:
        path = TRAIN_FLAGS.get(action.dest)
        if path is None or (action.help and "(default: " in action.help):
            continue
        key = ".".join(path)
        value = defaults
        for part in path:
            value = value[part]
        if value is None and key in by_family:
            shown = f"{by_family[key]} for {DEFAULT_MODEL}, set by the model family"
        else:
            shown = value if value not in ("", None) else "none"
        note = f"(default: {shown}; config key {key})"
        action.help = f"{action.help} {note}" if action.help else note


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="captune", description="Fine-tune, evaluate and run BLIP image captioners on your own images."
    )
    _global_flags(parser, top=True)
    parser.add_argument("--version", action="version", version=f"captune {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="fine-tune a BLIP model on an image folder",
                                description="Fine-tune a BLIP model; writes config.yaml, metrics.jsonl, best/ and "
                                "last/ in --output. Hugging Face Trainer's flag names (--learning-rate, "
                                "--num-train-epochs, --per-device-train-batch-size, ..., with - or _) are accepted "
                                "as aliases.")
    train.add_argument("--data", help="image folder with metadata.jsonl/metadata.csv (or train/ + validation/)")
    train.add_argument("--model", help="hub id, local model directory, or 'tiny'")
    train.add_argument(*_trainer_alias("output", "output-dir"), dest="output", help="run directory")
    train.add_argument("--config", help="YAML recipe (see configs/); flags and --set override it")
    train.add_argument(*_trainer_alias("epochs", "num-train-epochs"), dest="epochs", type=int,
                       help="passes over the training pairs")
    train.add_argument(*_trainer_alias("max-steps"), dest="max_steps", type=int,
                       help="stop after N optimizer steps (0 = run all epochs)")
    train.add_argument(*_trainer_alias("batch-size", "per-device-train-batch-size"), dest="batch_size",
                       type=_batch_size, help="pairs per process per step, or 'auto' (GPU: the largest that fits)")
    train.add_argument(*_trainer_alias("grad-accum", "gradient-accumulation-steps"), dest="grad_accum", type=int,
                       help="micro-batches per optimizer step")
    train.add_argument(*_trainer_alias("lr", "learning-rate"), dest="lr", type=float, help="peak learning rate")
    train.add_argument(*_trainer_alias("weight-decay"), dest="weight_decay", type=float,
                       help="AdamW weight decay (not on biases and norm weights)")
    train.add_argument(*_trainer_alias("warmup-ratio"), dest="warmup_ratio", type=float,
                       help="fraction of the steps warming the learning rate up from 0")
    train.add_argument("--val-split", type=float, help="hold out this fraction of images when the data has no validation/ folder")
    train.add_argument("--prompt", help="caption prefix masked out of the loss (the COCO recipe uses 'a picture of ')")
    train.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"])
    train.add_argument(*_trainer_alias("seed"), dest="seed", type=int, help="seeds model init (tiny), data order, dropout")
    train.add_argument("--num-workers", type=int, help="DataLoader workers")
    train.add_argument(*_trainer_alias("eval-every", "eval-steps"), dest="eval_every", type=int,
                       help="validate every N optimizer steps instead of at epoch ends (0 = at epoch ends)")
    train.add_argument("--eval-every-epochs", type=int,
                       help="validate at every Nth epoch end (the run always ends with a validation)")
    train.add_argument(*_trainer_alias("log-every", "logging-steps"), dest="log_every", type=int,
                       help="write a training line to metrics.jsonl every N steps (the first and last always)")
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
    train.add_argument(*_trainer_alias("save-every", "save-steps"), dest="save_every", type=int,
                       help="write a resumable checkpoint every N optimizer steps (and at each epoch end)")
    train.add_argument("--keep-last", type=int, help="keep the newest K checkpoints in RUN/checkpoints while training")
    train.add_argument("--keep-checkpoints", action="store_true", default=None,
                       help="keep RUN/checkpoints after a clean finish (removed by default: best/ and last/ hold "
                       "the models)")
    train.add_argument(*_trainer_alias("resume", "resume-from-checkpoint"), dest="resume", nargs="?", const=True,
                       default=False, metavar="RUN_OR_CHECKPOINT",
                       help="continue a run from its newest checkpoint: the --output run, or the run directory (or "
                       "its newest checkpoint) given here; its config.yaml unless --config is given")
    train.add_argument("--dry-run", action="store_true",
                       help="print the resolved config, the data counts and the trainable parameters, then exit "
                       "without writing anything")
    train.add_argument("--push-to-hub", metavar="REPO",
                       help="after training, upload best/ (model card included) to this Hugging Face Hub repo "
                       "(owner/name); checked before training starts")
    train.add_argument("--hub-private", action="store_true", help="create the --push-to-hub repo as private")
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
    export.add_argument("--push-to-hub", metavar="REPO", help="then upload it to this Hugging Face Hub repo (owner/name)")
    export.add_argument("--hub-private", action="store_true", help="create the --push-to-hub repo as private")

    demo = commands.add_parser("demo", help="fine-tune the tiny model on the embedded synthetic shapes (offline, CPU)",
                               description="Makes the synthetic dataset, captions held-out images, fine-tunes the tiny "
                               "model, captions them again and prints before/after metrics. Writes RUN/demo.json.")
    demo.add_argument("--output", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--epochs", type=int, help="override the demo's epochs")
    demo.add_argument("--model", default="tiny", help="the tiny preset to fine-tune (default tiny, BLIP; e.g. "
                      "tiny-florence2)")
    _show_config_defaults(train)
    for sub in commands.choices.values():
        _global_flags(sub, top=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet, args.verbose)
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


def _setup_logging(quiet: bool, verbose: bool = False) -> None:
    logger = logging.getLogger("captune")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("captune: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    # Point at the current stderr on every call: main() may run many times in one process (tests, notebooks).
    logger.handlers[0].stream = sys.stderr
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    import transformers

    if verbose:
        transformers.logging.set_verbosity_warning()
        return

    # transformers' own warnings (e.g. generation config notes) drown ours; errors still show. Its per-load
    # "Loading weights" / "Writing model shards" bars are noise next to ours (Hub download bars are kept).
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def train_overrides(args) -> dict:
    """Map explicit train flags onto the config tree (None = not given, leave the recipe's value)."""
    values: dict = {}
    for dest, path in TRAIN_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return values


def resume_target(resume, output: str | None) -> str | None:
    """The run directory `--resume [RUN_OR_CHECKPOINT]` continues (None: --resume not given).

    Raises:
        CaptuneError: no run named, a run that contradicts --output, or a checkpoint that is not the newest.
    """
    from .checkpoint import latest_checkpoint

    if resume is False:
        return None
    if resume is True:
        if not output:
            raise CaptuneError("--resume needs --output RUN (the run directory to continue)")
        return output
    given = Path(resume)
    run = given
    if given.parent.name == "checkpoints":  # Trainer users pass RUN/checkpoints/step-N
        run = given.parent.parent
        newest = latest_checkpoint(run)
        if newest is None or newest.resolve() != given.resolve():
            raise CaptuneError(f"--resume {resume}: captune continues from a run's newest checkpoint "
                               f"({newest or 'none found'}); pass the run directory {run}")
    if output and Path(output).resolve() != run.resolve():
        raise CaptuneError(f"--resume {resume} continues the run in {run}, but --output says {output}: drop one")
    return str(run)


def cmd_train(args) -> int:
    from .config import apply_override, from_dict, load_config, to_dict
    from .train import train

    recipe = args.config
    run = resume_target(args.resume, args.output)
    overrides = train_overrides(args)
    if run is not None:
        overrides["output"] = run
        if recipe is None:
            saved = Path(run) / "config.yaml"
            recipe = saved if saved.is_file() else None  # a run killed before it wrote anything: flags alone
    cfg = load_config(recipe, overrides)
    values = to_dict(cfg)
    for assignment in args.set:
        apply_override(values, assignment)
    cfg = from_dict(values)
    if not cfg.data.path:
        raise CaptuneError("no data: pass --data DIR (an image folder with metadata.jsonl) or set data.path in --config")
    if args.push_to_hub:
        from .hub import check_hub

        check_hub(args.push_to_hub)  # offline or logged out: one line now, not after hours of training
    if args.dry_run:
        return dry_run(cfg)
    result = train(cfg, resume=run is not None, overwrite=args.overwrite)
    if result.interrupted:
        # A requested stop (SIGINT/SIGTERM, e.g. a preempted job) that saved its checkpoint is a clean exit.
        return 0
    kept = (f"checkpoints kept in {result.output}/checkpoints (--keep-checkpoints)" if result.checkpoints_kept
            else "resumable checkpoints removed (finished cleanly; --keep-checkpoints keeps them)")
    log.info("done: %d steps; best %s %s at step %s; models in %s/best and %s/last; %s", result.steps,
             cfg.train.best_metric, _fmt(result.best_score), result.best_step, result.output, result.output, kept)
    if args.push_to_hub:
        from .hub import push_folder

        url = push_folder(Path(result.output) / "best", args.push_to_hub, private=args.hub_private,
                          message=f"captune: best/ of {result.output} (step {result.best_step})")
        log.info("pushed %s/best to %s", result.output, url)
    return 0


def dry_run(cfg) -> int:
    """Print what `train(cfg)` would do (resolved config, data counts, trainable parameters); write nothing."""
    import yaml

    from .config import to_dict
    from .data import build_dataset, count_captions
    from .finetune import freeze_summary
    from .train import resolved, trainable_model

    cfg = resolved(cfg)  # the model family's defaults filled in, as train() fills them
    print("# resolved configuration (captune train --config accepts this)")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    data = build_dataset(
        cfg.data.path, cfg.data.val_split, cfg.train.seed, data_format=cfg.data.format, image_root=cfg.data.image_root,
        image_column=cfg.data.image_column, caption_column=cfg.data.caption_column,
        train_split=cfg.data.train_split, eval_split=cfg.data.eval_split, strict=False,
    )
    validation = data.validation[: cfg.data.max_val_images or None]
    print(f"\n# data ({data.format}): {len(data.train)} training images, {count_captions(data.train)} captions; "
          f"{len(validation)} validation images, {sum(len(s.captions) for s in validation)} captions; "
          f"{len(data.problems)} unusable row(s) skipped")
    model, _ = trainable_model(cfg)
    print(f"# model {cfg.model.name} (mode {cfg.train.mode}): {freeze_summary(model)}")
    print(f"# dry run: nothing written ({cfg.output} untouched)")
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
    from .train import settle_collectives

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
    settle_collectives(accelerator)
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
        progress=not args.quiet,
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
    import shutil

    from .checkpoint import export_merged

    if args.push_to_hub:
        from .hub import check_hub

        check_hub(args.push_to_hub)
    output = export_merged(args.run, args.output, overwrite=args.overwrite)
    source = Path(args.run) / "best" if (Path(args.run) / "best").is_dir() else Path(args.run)
    if (source / "README.md").is_file() and not (output / "README.md").exists():
        shutil.copy(source / "README.md", output / "README.md")  # the model card goes along
    log.info("wrote %s (loads with transformers' from_pretrained, no captune or peft needed)", output)
    if args.push_to_hub:
        from .hub import push_folder

        url = push_folder(output, args.push_to_hub, private=args.hub_private, message=f"captune export of {args.run}")
        log.info("pushed %s to %s", output, url)
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
