"""One typed configuration tree: YAML values, dotted overrides (`train.lr=1e-5`), validated on construction.

YAML holds values only; nothing in it names code to import.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from .errors import CaptuneError
from .models import DEFAULT_MODEL


@dataclass
class DataConfig:
    """Where the images and captions come from and how captions are tokenised."""

    path: str = ""
    """Dataset location: an image folder with metadata.jsonl/metadata.csv (or train/ and validation/ subfolders)."""
    val_split: float = 0.0
    """Fraction of training images held out for validation when the data has no validation folder (0 = none)."""
    max_caption_tokens: int | None = None
    """Captions are truncated to this many tokens, special tokens and prompt included (unset: the model family's
    default, 40 for BLIP as the original)."""
    prompt: str = ""
    """Text every caption starts with, masked out of the loss and stripped from generated captions."""
    num_workers: int = 2
    """DataLoader worker processes decoding and resizing images (0 = in the main process)."""
    max_val_images: int = 0
    """Evaluate on at most this many validation images during training (0 = all)."""
    format: Literal["auto", "folder", "sidecar", "coco", "karpathy", "hf", "webdataset"] = "auto"
    """Reader for `path`; auto tells it from what is there (metadata file, .txt sidecars, .json, .tar, save_to_disk)."""
    image_root: str = ""
    """Folder COCO/Karpathy image file names are relative to (default: the annotation file's folder)."""
    image_column: str = ""
    """Hugging Face datasets: the image column (empty = the Image feature, else image/img)."""
    caption_column: str = ""
    """Hugging Face datasets: the caption column (empty = text, caption, captions or sentences)."""
    train_split: str = "train"
    """Hugging Face datasets: the split to train on."""
    eval_split: str = ""
    """Hugging Face datasets: the held-out split (empty = validation, val or test when present)."""
    caption_sampling: Literal["all", "random", "grouped"] = "all"
    """Images with several captions: `all` trains on every pair each epoch (BLIP); `random` on one drawn per image;
    `grouped` on every pair, an image's captions kept next to each other so a batch encodes each image once (the
    ViT is ~85% of a step's FLOPs: up to ~3x faster with COCO's 5 captions, at the cost of less varied batches)."""
    on_bad_sample: Literal["skip", "error"] = "skip"
    """A corrupt image, missing file or empty caption: `skip` counts and names it (summary.json), `error` stops."""
    max_image_pixels: int = 100_000_000
    """Refuse images with more pixels than this (decompression bombs)."""
    augment: bool = False
    """RandomResizedCrop (scale 0.5-1, bicubic) as BLIP trains; no flip (it breaks left/right captions)."""
    normalize_captions: bool = False
    """BLIP's pre_caption on training captions: lower case, punctuation out, at most max_words words."""
    max_words: int = 30
    """Word cap of normalize_captions."""

    def __post_init__(self):
        if not 0 <= self.val_split < 1:
            raise ValueError(f"data.val_split must be in [0, 1), got {self.val_split}")
        if self.max_caption_tokens is not None and self.max_caption_tokens < 3:
            raise ValueError(f"data.max_caption_tokens must be >= 3 ([DEC], a word, [SEP]), got {self.max_caption_tokens}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.max_image_pixels < 1 or self.max_words < 1:
            raise ValueError("data.max_image_pixels and data.max_words must be >= 1")


@dataclass
class ModelConfig:
    """Which BLIP to start from."""

    name: str = DEFAULT_MODEL
    """A hub id, a local save_pretrained directory, or a preset (`tiny`: small random BLIP for CPU runs and tests).
    Its config.json's model_type picks the model family (captune.models), whose defaults fill unset fields."""


@dataclass
class TrainConfig:
    """Optimisation: AdamW, linear warmup then cosine decay, accumulation and clipping."""

    epochs: int = 5
    """Passes over the training pairs."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    batch_size: int | Literal["auto"] | None = None
    """Image-caption pairs per process per forward pass; `auto` (GPU only) = the largest that fits, shrinking from 256
    (unset: the model family's default, 16 for BLIP)."""
    grad_accum: int = 1
    """Forward passes accumulated per optimizer step (global batch = batch_size x grad_accum x processes)."""
    lr: float | None = None
    """Peak learning rate (unset: the model family's default: 1e-5 for BLIP as its caption fine-tuning at batch
    256, small data often wants 2e-5 to 5e-5; 1e-3 for the random `tiny` preset)."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay (0.05 as the original); never applied to biases and norm weights."""
    warmup_ratio: float = 0.05
    """Fraction of the optimizer steps spent warming the learning rate up linearly from 0."""
    min_lr_ratio: float = 0.0
    """The cosine decays to this fraction of the peak learning rate."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 = no clipping)."""
    label_smoothing: float = 0.1
    """Label smoothing of the caption loss (0.1 as the original BLIP; transformers' default is 0)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """`auto` = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU (bf16 autocast is slower on most CPUs)."""
    seed: int = 42
    """Seeds model init (tiny), data order and dropout."""
    eval_every_steps: int = 0
    """Validate every N optimizer steps instead of at epoch ends (0 = at epoch ends, see eval_every_epochs)."""
    eval_every_epochs: int = 1
    """Without eval_every_steps: validate at the end of every Nth epoch (the run always ends with a validation)."""
    log_every_steps: int = 10
    """Write a training line to metrics.jsonl every N optimizer steps."""
    best_metric: str = "cider"
    """Validation metric that picks best/ (higher is better); `cider+bleu_4` sums the two, as the BLIP recipe."""
    mode: Literal["full", "frozen-vision", "frozen-lm", "lora"] | None = None
    """What trains: everything, everything but the vision encoder, everything but the language model (BLIP-2: ViT and
    Q-Former, the paper's fine-tuning), or LoRA adapters (base weights frozen). Unset: the model family's default
    (full; frozen-lm for a pretrained BLIP-2)."""
    lora_rank: int = 16
    """LoRA rank r."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch input."""
    lora_targets: str | None = None
    """Comma-separated Linear names the family's LoRA adapts (BLIP: the text decoder's self- and cross-attention
    query, key, value, dense; unset: the family's default, query,value for BLIP)."""
    lora_vision: bool = False
    """Also put LoRA on the vision encoder's attention (its fused qkv and output projection)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    save_every_steps: int = 0
    """Write a resumable checkpoint to RUN/checkpoints/ every N optimizer steps (0 = only at epoch ends)."""
    keep_last: int = 1
    """Keep this many newest checkpoints in RUN/checkpoints/ while the run goes (older ones are deleted)."""
    keep_checkpoints: bool = False
    """Keep RUN/checkpoints/ after the run finishes cleanly (by default it is removed: best/ and last/ hold the
    models, and a finished run has nothing to resume). An interrupted or failed run always keeps it."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss: stop the run (checkpoints on disk stay good) or skip that optimizer step."""
    early_stopping_patience: int = 0
    """Stop after this many validations without a better best_metric (0 = never stop early)."""
    report_to: str = "auto"
    """Trackers besides metrics.jsonl: `auto` (TensorBoard when installed), `none`, or a comma list of
    tensorboard, wandb, mlflow."""
    sdpa: bool = True
    """Fused scaled-dot-product attention in BLIP's vision and text attention (same numbers as eager, faster)."""
    compile: bool = False
    """torch.compile the training forward with dynamic shapes (one compilation for every caption length). Costs a
    minute or more up front; measured no faster on the 2-core CPU (benchmarks/RESULTS.md), unmeasured on GPUs."""
    fused_adamw: bool = True
    """AdamW's fused kernel (one kernel per step over all parameters; CUDA and CPU)."""
    objective: Literal["ce", "scst"] = "ce"
    """`ce`: cross-entropy on the reference captions. `scst`: self-critical sequence training (Rennie et al. 2017), a
    second stage from a cross-entropy fine-tuned model (--model RUN/best): sampled captions rewarded by their CIDEr-D
    against the image's references (document frequencies from the training captions), see captune/scst.py.
    batch_size then counts images, each sampled scst_samples times."""
    scst_samples: int = 5
    """SCST: captions sampled per image (k)."""
    scst_baseline: Literal["mean", "greedy"] = "mean"
    """SCST: what a sample's reward is compared with: the mean reward of the image's other samples (Luo 2020, no
    extra decoding) or the reward of the greedy caption (Rennie et al. 2017, one more decoding per image)."""

    def __post_init__(self):
        if self.epochs < 1 and self.max_steps < 1:
            raise ValueError("train.epochs or train.max_steps must be >= 1")
        if self.batch_size not in ("auto", None) and self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1 or auto, got {self.batch_size}")
        for name in ("grad_accum", "log_every_steps", "lora_rank", "lora_alpha", "keep_last", "eval_every_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and (not self.lr > 0 or not math.isfinite(self.lr)):  # `nan <= 0` is False
            raise ValueError(f"train.lr must be > 0 and finite, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_steps < 0 or self.eval_every_steps < 0:
            raise ValueError("train.max_steps and train.eval_every_steps must be >= 0")
        if self.save_every_steps < 0 or self.early_stopping_patience < 0:
            raise ValueError("train.save_every_steps and train.early_stopping_patience must be >= 0")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"train.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_targets is not None and not [t for t in self.lora_targets.split(",") if t.strip()]:
            raise ValueError("train.lora_targets must name at least one module (e.g. query,value)")
        if self.objective == "scst":
            if self.scst_samples < (2 if self.scst_baseline == "mean" else 1):
                raise ValueError(f"train.scst_samples must be >= 2 with scst_baseline mean (the baseline is the mean "
                                 f"of an image's other samples), got {self.scst_samples}")
            if self.batch_size == "auto":
                raise ValueError("train.batch_size auto probes cross-entropy batches; give SCST a number of images")
        trackers = {t.strip() for t in self.report_to.split(",")}
        if not trackers <= {"auto", "none", "tensorboard", "wandb", "mlflow"}:
            raise ValueError(f"train.report_to must be auto, none, or a comma list of tensorboard, wandb, mlflow; "
                             f"got {self.report_to!r}")


@dataclass
class EvalConfig:
    """How validation captions are generated."""

    num_beams: int | None = None
    """Beam width (1 = greedy; unset: the model family's default, 3 for BLIP as its paper)."""
    max_new_tokens: int | None = None
    """Longest caption, in tokens after the prompt ([SEP] included; unset: the model family's default). BLIP's is
    16 = its captioning decode: max_length 20 counts [DEC] and its prompt "a picture of" (4 positions). captune
    counts new tokens only, so a prompt never shortens the caption."""
    min_new_tokens: int | None = None
    """Shortest caption, in tokens after the prompt (unset: the model family's default). BLIP's is 1 = its
    min_length 5 less its 4 prompt positions (0 allows an empty caption)."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the caption (1 = off); recorded in captune.json with the other options, so
    the saved model decodes as it was validated."""
    no_repeat_ngram_size: int = 0
    """Forbid any token n-gram of this size from occurring twice in a caption (3 is common; 0 = off)."""
    length_penalty: float = 1.0
    """Beam search: a caption's score is log-probability / length**length_penalty (>1 favours longer captions)."""
    batch_size: int = 32
    """Images per generation batch."""
    caption_before: bool = True
    """Caption the validation images once before the first step (RUN/val_predictions_before.jsonl, the report's
    "before" column and the step-0 point of its validation plot)."""

    def __post_init__(self):
        if any(v is not None and v < 1 for v in (self.num_beams, self.batch_size, self.max_new_tokens)):
            raise ValueError("eval.num_beams, eval.batch_size and eval.max_new_tokens must be >= 1")
        if self.min_new_tokens is not None and not 0 <= self.min_new_tokens <= (self.max_new_tokens or 10**9):
            raise ValueError(f"eval.min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.repetition_penalty <= 0 or self.no_repeat_ngram_size < 0:
            raise ValueError(f"eval.repetition_penalty must be > 0 and eval.no_repeat_ngram_size >= 0, got "
                             f"{self.repetition_penalty} and {self.no_repeat_ngram_size}")


@dataclass
class Config:
    """Everything a training run needs; written resolved to RUN/config.yaml."""

    output: str = "runs/captune"
    """Run directory (created)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Fields whose unset value (None) means "what the model's family says" (captune.models, `defaults(name)`).
FAMILY_DEFAULTED = ("train.mode", "train.lr", "train.batch_size", "train.lora_targets", "data.max_caption_tokens",
                    "eval.num_beams", "eval.max_new_tokens", "eval.min_new_tokens")


def resolve_defaults(cfg: Config, defaults: dict) -> Config:
    """A new Config with every unset FAMILY_DEFAULTED field filled from the model family's `defaults`.

    Values a recipe, YAML file, flag or override set are kept: only None is filled. The result is what the run
    directory's config.yaml records, so a resumed or repeated run does not depend on the family's defaults changing.

    Raises:
        CaptuneError: the family gives no value for an unset field, or an invalid one.
    """
    values = to_dict(cfg)
    for dotted in FAMILY_DEFAULTED:
        section, key = dotted.split(".")
        if values[section][key] is None:
            # Every family trains everything unless it says otherwise (BLIP-2's pretrained default is frozen-lm).
            value = defaults.get(dotted, "full" if dotted == "train.mode" else None)
            if value is None:
                raise CaptuneError(f"{dotted} is not set and the model family has no default for it: set it")
            values[section][key] = value
    return from_dict(values)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict, cls=Config, where: str = ""):
    """Build a (nested) config dataclass from plain values, rejecting unknown keys and wrong types.

    Raises:
        CaptuneError: unknown key, wrong type or invalid value, naming the dotted key.
    """
    if not isinstance(values, dict):
        raise CaptuneError(f"config{' ' + where if where else ''}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else key
        if key not in known:
            raise CaptuneError(f"unknown config key '{dotted}' (known: {', '.join(sorted(known))})")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if value is not None and not isinstance(value, dict):
                # `--set train=0` would otherwise reset the whole section to its defaults without a word.
                first = dataclasses.fields(kind)[0].name
                raise CaptuneError(f"{dotted} is a section, not a value (got {value!r}): set one of its keys, e.g. "
                                   f"--set {dotted}.{first}=...")
            kwargs[key] = from_dict(value or {}, kind, dotted)
        else:
            kwargs[key] = _coerce(value, kind, dotted)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise CaptuneError(f"invalid config: {exc}") from exc


def _coerce(value, kind, dotted: str):
    origin = typing.get_origin(kind)
    if origin is Literal:
        if value not in typing.get_args(kind):
            raise CaptuneError(f"{dotted} must be one of {', '.join(map(str, typing.get_args(kind)))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:  # e.g. `int | Literal["auto"]`: the first type that accepts the value
            try:
                return _coerce(value, arg, dotted)
            except CaptuneError:
                pass
        return _coerce(value, args[-1], dotted)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise CaptuneError(f"{dotted} must be true or false, got {value!r}")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise CaptuneError(f"{dotted} must be a finite number, got {value!r}")
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise CaptuneError(f"{dotted} must be {kind.__name__}, got {value!r}")


def apply_override(values: dict, assignment: str) -> None:
    """Apply `a.b=value` (value parsed as YAML) to a nested dict in place."""
    if "=" not in assignment:
        raise CaptuneError(f"override {assignment!r} must look like section.key=value (e.g. train.lr=1e-5)")
    key, raw = assignment.split("=", 1)
    value = _parse_scalar(raw)
    node = values
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise CaptuneError(f"override {assignment!r}: {part} is not a section")
    node[parts[-1]] = value


def _parse_scalar(raw: str):
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML 1.1 reads 1e-5 as a string; people write learning rates that way.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") and not value.isalpha() else value
        except ValueError:
            return value
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Load a YAML recipe (optional), apply overrides, validate.

    Args:
        path: YAML file with any subset of the config tree.
        overrides: dotted assignments (`train.lr=1e-5`) or a nested dict, applied after the file.

    Raises:
        CaptuneError: missing or malformed file, unknown keys, invalid values.
    """
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CaptuneError(f"config file {path} not found")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise CaptuneError(f"{where}: not valid YAML ({what}): check the indentation and quoting there") from exc
        if not isinstance(values, dict):
            raise CaptuneError(f"config file {path} must hold a mapping of sections (data, model, train, eval)")
    if isinstance(overrides, dict):
        _merge(values, overrides)
    else:
        for assignment in overrides or []:
            apply_override(values, assignment)
    return from_dict(values)


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
