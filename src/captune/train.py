"""The training loop: Accelerate, AdamW, warmup + cosine, validation, best/ and last/, checkpoints and resume."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from .checkpoint import (
    CHECKPOINTS,
    StopRequests, checkpoint_dirs, clear_run_state, existing_run, keep_best_for_resume, latest_checkpoint,
    load_checkpoint, remove_partial_checkpoints, restore_best, save_checkpoint, save_model,
)
from .config import Config, resolve_defaults, save_config, to_dict
from .data import build_dataset, count_captions, training_dataset
from .data.collate import CaptionCollator, CaptionPairs, ItemOptions
from .data.sampling import EpochSampler
from .errors import CaptuneError
from .evaluate import evaluate
from .files import truncate_lines, write_json, write_jsonl
from .metrics import guard_warnings
from .finetune import apply_mode, enable_gradient_checkpointing, find_batch_size, freeze_summary
from .generate import RECORDED_OPTIONS, GenerationOptions
from .model import load_model_and_processor
from .modelcard import model_card
from .models import family_defaults, family_of, family_of_processor
from .models.common import caption_loss, caption_loss_sum, target_tokens  # noqa: F401  (re-exported for callers)
from .report import write_report
from .scst import ScstCollator, ScstImages, build_scst, scst_backward_window
from .runinfo import data_commit, library_versions, loss_floor, peak_memory
from .seeding import seed_loader, seed_micro_batch
from .speed import apply_speed_levers, share_images

__all__ = ["TrainResult", "accumulation_windows", "caption_loss", "caption_loss_sum", "eval_options", "save_model",
           "selection_score", "train", "window_tokens"]

log = logging.getLogger("captune")


@dataclass
class TrainResult:
    output: Path
    steps: int
    best_score: float | None
    best_step: int | None
    final_metrics: dict = field(default_factory=dict)
    """Validation metrics of the last evaluation (empty without validation data)."""
    interrupted: str | None = None
    """The signal (SIGINT, SIGTERM) that stopped the run after a checkpoint; None when it ran to the end."""
    checkpoints_kept: bool = True
    """Whether RUN/checkpoints/ is still there (a clean finish removes it unless train.keep_checkpoints)."""


def resolve_mixed_precision(mode: str) -> str:
    """`auto`: bf16 where the GPU supports it, fp16 on older GPUs, fp32 ("no") on CPU, where autocast is slower."""
    if mode != "auto":
        return mode
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def launched_on_cpus() -> bool:
    """True under a multi-process launcher (torchrun, accelerate launch) on a machine without CUDA."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_trackers(report_to: str) -> list[str]:
    """Accelerate tracker names for `train.report_to`; `auto` = TensorBoard when it is installed.

    Raises:
        CaptuneError: a tracker was asked for whose package is not installed.
    """
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if names == ["auto"]:
        return ["tensorboard"] if is_tensorboard_available() else []
    chosen = [n for n in names if n not in ("none", "auto")]
    for name in chosen:
        if not available[name]():
            raise CaptuneError(f"--report-to {name}: the {name} package is not installed (pip install {name})")
    return chosen


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices, never biases or normalisation weights (1-D parameters)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or name.endswith(".bias") else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def accumulation_windows(batches, size: int):
    """Consecutive lists of `size` batches (the last of an epoch may be shorter): one optimizer step each.

    A resumed epoch starts on a window boundary (checkpoints are taken after optimizer steps), so windows line up
    with the uninterrupted run's. Holding a window's batches at once costs `size - 1` batches of memory.
    """
    iterator = iter(batches)
    while window := list(itertools.islice(iterator, size)):
        yield window


def window_tokens(accelerator, window: list[dict], family) -> torch.Tensor:
    """Caption tokens of the whole accumulation window (the family's `target_tokens`), summed over its
    micro-batches and every process.

    The loss of an optimizer step is the mean over these tokens (see `train`); one all-reduce a window.
    """
    local = torch.stack([family.target_tokens(batch) for batch in window]).sum().to(accelerator.device)
    return accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local


def batch_loss_sum(model, batch: dict, label_smoothing: float) -> torch.Tensor:
    """The training objective on one collated batch, summed over its caption tokens: the model family's
    `loss_sum`. Training and the validation loss both call it, so they measure the same thing."""
    return family_of(model).loss_sum(model, batch, label_smoothing=label_smoothing)


@torch.no_grad()
def validation_loss(model, loader, label_smoothing: float, accelerator) -> float | None:
    """Teacher-forced loss over every validation (image, caption) pair, per caption token as training's, computed
    by the training objective itself (label smoothing included); None when there is no caption token.

    Each process takes its shard of `loader`; the sums meet in one all-reduce.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=accelerator.device)
    for batch in loader:
        batch.pop("skipped", None)
        if not batch.pop("pairs"):
            continue
        total += torch.stack([batch_loss_sum(model, batch, label_smoothing).float(),
                              family_of(model).target_tokens(batch).float()])
    model.train(was_training)
    loss_sum, tokens = accelerator.reduce(total, reduction="sum").tolist() if accelerator.num_processes > 1 \
        else total.tolist()
    return loss_sum / tokens if tokens else None


def resolved(cfg: Config, model=None) -> Config:
    """`cfg` with the fields it leaves unset filled from its model family's defaults (explicit values win).

    Args:
        model: the already loaded model train() was handed, whose family then decides; else cfg.model.name's.

    Raises:
        CaptuneError: cfg.model.name is not a supported family (read from its config.json, before any weights load).
    """
    defaults = family_of(model).defaults(cfg.model.name) if model is not None else family_defaults(cfg.model.name)
    return resolve_defaults(cfg, defaults)


def eval_options(cfg: Config) -> GenerationOptions:
    """How validation decodes (the family's defaults where cfg leaves eval options unset)."""
    if None in (cfg.eval.num_beams, cfg.eval.max_new_tokens, cfg.eval.min_new_tokens):
        cfg = resolved(cfg)
    return GenerationOptions(
        num_beams=cfg.eval.num_beams, max_new_tokens=cfg.eval.max_new_tokens,
        min_new_tokens=cfg.eval.min_new_tokens, prompt=cfg.data.prompt,
        repetition_penalty=cfg.eval.repetition_penalty, no_repeat_ngram_size=cfg.eval.no_repeat_ngram_size,
        length_penalty=cfg.eval.length_penalty,
    )


def selection_score(metrics: dict, best_metric: str) -> float:
    """The number best/ is chosen by: one metric, or a `+`-joined sum (e.g. `cider+bleu_4`)."""
    total = 0.0
    for key in best_metric.split("+"):
        if metrics.get(key) is None:
            raise CaptuneError(f"train.best_metric: validation produced no '{key}' (have: {', '.join(metrics)})")
        total += metrics[key]
    return total


class MetricsLog:
    """Appends one JSON object a line to RUN/metrics.jsonl (main process only), flushed each line.

    `lines` counts the file's lines so a checkpoint can record how far the log had got.
    """

    def __init__(self, path: Path, enabled: bool, lines: int = 0):
        self.handle = open(path, "a", encoding="utf-8") if enabled else None
        self.lines = lines

    def write(self, **record) -> None:
        self.lines += 1
        if self.handle:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle:
            self.handle.close()


def flat_config(cfg: Config) -> dict:
    """The config as `section.key: value` scalars, the shape trackers' hyper-parameter tables take."""
    flat = {}
    for section, values in to_dict(cfg).items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            flat[f"{section}.{key}" if key else section] = value
    return flat


def training_loader(cfg: Config, train_data, processor, collator, batch_size: int, accelerator):
    """(dataset, loader, sampler) for training; the sampler is None for streamed shards, which order themselves.

    A list's loader is prepared by the caller with the model (Accelerate shards it); a stream splits itself across
    processes and workers (data/wds.py), so its loader is only wrapped for device placement and end-of-epoch
    detection (gradient accumulation then steps on an epoch's last, partial window too).
    """
    size = family_of_processor(processor).image_size(processor)
    options = ItemOptions(max_pixels=cfg.data.max_image_pixels, draft_size=size, augment_size=size if cfg.data.augment
                          else 0, normalize_captions=cfg.data.normalize_captions, max_words=cfg.data.max_words)
    if cfg.train.objective == "scst":  # each image once, with its index: its references are the reward's
        items = ScstImages(train_data, options, seed=cfg.train.seed)
    else:
        items = training_dataset(
            train_data, caption_sampling=cfg.data.caption_sampling, rank=accelerator.process_index,
            world_size=accelerator.num_processes, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
            options=options,
        )
    workers = cfg.data.num_workers
    # Its own generator (reseeded each epoch by seed_loader), so creating an iterator never draws from the global RNG.
    generator = torch.Generator()
    if isinstance(items, IterableDataset):
        # Not persistent: a stream's workers must be re-created each epoch to see its new epoch number (seeding).
        loader = DataLoader(items, batch_size=batch_size, collate_fn=collator, num_workers=workers,
                            pin_memory=torch.cuda.is_available(), generator=generator)
        return items, prepare_data_loader(loader, device=accelerator.device, num_processes=1, process_index=0,
                                          put_on_device=True, dispatch_batches=False), None
    # Data order is a function of (seed, epoch) alone, so a resumed run replays the interrupted epoch's order.
    sampler = EpochSampler(len(items), cfg.train.seed, groups=items.groups())
    loader = DataLoader(items, batch_size=batch_size, sampler=sampler, collate_fn=collator, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), generator=generator)
    return items, loader, sampler


def trainable_model(cfg: Config, model=None, processor=None):
    """The model (loaded from cfg.model unless given) with the training mode, memory savers and speed levers on."""
    if model is None:
        model, processor = load_model_and_processor(cfg.model.name, seed=cfg.train.seed)
    t = cfg.train
    model = apply_mode(model, t.mode, lora_rank=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                       lora_targets=t.lora_targets, lora_vision=t.lora_vision)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    apply_speed_levers(model, sdpa=t.sdpa, compile=t.compile)
    return model, processor


def _check_run_directory(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an --output that cannot hold a run, or that holds another run (unless resuming or overwriting)."""
    if output.exists() and not output.is_dir():
        raise CaptuneError(f"--output {output} is a file: pass a directory for the run (it is created)")
    parent = next((p for p in [output, *output.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CaptuneError(f"--output {output}: {parent} is not writable: choose a directory you can write to")
    found = existing_run(output)
    if found and not (resume or overwrite):
        raise CaptuneError(f"--output {output} already holds a run ({', '.join(found)}): pass --resume to continue "
                           "it, --overwrite to replace it, or choose another --output")


def _start_run_directory(output: Path, cfg: Config, fresh: bool) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CaptuneError(f"--output {output}: cannot create the run directory ({exc.strerror})") from exc
    if fresh:
        clear_run_state(output)
    remove_partial_checkpoints(output)
    save_config(cfg, output / "config.yaml")


def validation_pairs(cfg: Config, validation: list, processor, collator, accelerator):
    """Every (image, caption) pair of the validation images, batched as training batches them (no augmentation),
    sharded across processes: the input of `validation_loss`. None without validation data."""
    if not validation:
        return None
    size = collator.family.image_size(processor)
    pairs = CaptionPairs(validation, "all", ItemOptions(
        max_pixels=cfg.data.max_image_pixels, draft_size=size, normalize_captions=cfg.data.normalize_captions,
        max_words=cfg.data.max_words))
    loader = DataLoader(pairs, batch_size=cfg.eval.batch_size, shuffle=False, collate_fn=collator,
                        num_workers=cfg.data.num_workers)
    return accelerator.prepare_data_loader(loader, device_placement=True)


class _TiedWeightsNote(logging.Filter):
    """Drops Accelerate's "Removed shared tensor {...} while saving" warning when every name it lists is a weight
    the model ties on purpose (BLIP's LM head is its word embeddings): expected and harmless at every checkpoint.
    Any other shared tensor is news and still shown."""

    def __init__(self, tied: set[str]):
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        found = re.match(r".*Removed shared tensor \{(.*)\} while saving", record.getMessage())
        if not found:
            return True
        names = {name.strip().strip("'\"") for name in found.group(1).split(",")}
        return not all(any(name.endswith(key) for key in self.tied) for name in names)


@contextlib.contextmanager
def quiet_tied_weights_note(model):
    """While saving: silence Accelerate's warning about the model's own tied weights (see _TiedWeightsNote)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ())
    note = _TiedWeightsNote(tied)
    target = logging.getLogger("accelerate.utils.other")
    target.addFilter(note)
    try:
        yield
    finally:
        target.removeFilter(note)


def _record_skips(items: list[dict], skipped: list[dict], on_bad_sample: str) -> None:
    for item in items:
        if on_bad_sample == "error":
            raise CaptuneError(f"bad training sample: {item['reason']} (data.on_bad_sample=skip goes on)")
        log.warning("skipped %s", item["reason"])
        skipped.append(item)


@dataclass
class Run:
    """What the loop's named steps share: the parts prepared before the loop and the counters they move on.

    `state` is what a checkpoint stores besides `step` (and the scheduler): restoring both continues the run exactly.
    """
    cfg: Config
    output: Path
    accelerator: Accelerator
    model: torch.nn.Module
    processor: object
    family: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    metrics_log: MetricsLog
    validation: list
    val_pairs: object
    """Every validation (image, caption) pair, for the validation loss; None without validation data."""
    options: GenerationOptions
    settings: dict
    """What best/ and last/ record of how they were trained and how they caption."""
    data_counts: dict
    state: dict
    step: int
    total_steps: int
    batch_size: int
    started: float
    """perf_counter() when train() began (the summary's wall time)."""
    final_metrics: dict = field(default_factory=dict)
    validation_seconds: float = 0.0
    """Kept out of the training throughput."""
    checkpointed_step: int | None = None
    seen: int = 0
    """Pairs trained since the last logged step (with `tick`, the logged samples/s)."""
    tick: float = 0.0
    pairs_trained: int = 0
    """Pairs this run trained on (a resumed run counts from its checkpoint): the summary's samples/s."""
    loop_started: float = 0.0
    last_train: dict | None = None
    """The newest training record not yet written to metrics.jsonl."""
    bar: object = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def _new_accelerator(cfg: Config, output: Path, trackers: list[str]) -> Accelerator:
    return Accelerator(
        # Without this Accelerate ignores torchrun's WORLD_SIZE on a machine with no GPU and every process trains
        # alone (writing the same files); with it, CPU processes join one gloo group.
        cpu=launched_on_cpus(),
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum, log_with=trackers or None, project_dir=str(output),
    )


def _load_data(cfg: Config):
    """(the dataset, the rows already unusable in its metadata as skip records, the validation images used)."""
    data = build_dataset(
        cfg.data.path, cfg.data.val_split, cfg.train.seed, data_format=cfg.data.format, image_root=cfg.data.image_root,
        image_column=cfg.data.image_column, caption_column=cfg.data.caption_column,
        train_split=cfg.data.train_split, eval_split=cfg.data.eval_split, strict=cfg.data.on_bad_sample == "error",
    )
    # Rows already unusable in the metadata (missing file, empty caption...) are skips like undecodable images.
    skipped = [{"id": p.id or p.where, "reason": str(p)} for p in data.problems]
    return data, skipped, data.validation[: cfg.data.max_val_images or None]


def _announce(cfg: Config, family, model, data, validation: list, skipped: list[dict], accelerator) -> None:
    log.info(
        "training %s (%s, mode %s) on %d images (%d captions), validating on %d images; %s; %s on %d "
        "process(es), precision %s", cfg.model.name, family.NAME, cfg.train.mode, len(data.train),
        count_captions(data.train), len(validation), freeze_summary(model), accelerator.device,
        accelerator.num_processes, accelerator.mixed_precision,
    )
    if not validation:
        log.warning("no validation data (no validation/ folder, data.val_split 0): best/ will be the last model")
    for item in skipped:
        log.warning("skipped %s", item["reason"])


def _restored_state(accelerator, output: Path, scheduler, skipped: list[dict], checkpoint: Path | None):
    """(state, step) to start from: the newest intact checkpoint's (the scheduler and, on the main process, the
    metrics log and best/ put back as they were then), or a fresh run's."""
    state = {"epoch": 0, "batch": 0, "best_score": None, "best_step": None, "stale_evals": 0, "metrics_lines": 0,
             "validated_step": None, "skipped": skipped}
    if checkpoint is None:
        return state, 0
    checkpoint, state = _restore_newest_intact(accelerator, output)
    step = state.pop("step")
    if "scheduler" in state:
        scheduler.load_state_dict(state.pop("scheduler"))
    if accelerator.is_main_process:
        truncate_lines(output / "metrics.jsonl", state["metrics_lines"])
        restore_best(output, state["best_step"])
    log.info("resuming from %s: step %d, epoch %d, batch %d", checkpoint, step, state["epoch"], state["batch"])
    return state, step


def _card(run: Run, metrics: dict, at_step: int) -> str:
    cfg = run.cfg
    return model_card(base_model=cfg.model.name, data=run.data_counts, hyperparameters=vars(cfg.train),
                      metrics=metrics, generation=run.settings["generation"], prompt=cfg.data.prompt, step=at_step,
                      family=run.family)


def _caption_before(run: Run, before) -> None:
    """The report's "before" captions: the untouched model, decoded exactly as validation will decode (unless the
    caller, the demo, has already done that and hands them over as `before`)."""
    cfg, accelerator = run.cfg, run.accelerator
    before = before or evaluate(run.model, run.processor, run.validation, run.options, accelerator=accelerator,
                                batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers,
                                desc="captioning before training", meteor=False)
    loss = validation_loss(run.model, run.val_pairs, cfg.train.label_smoothing, accelerator)
    if run.main:
        run.metrics_log.write(step=0, epoch=0, split="before", **before.metrics,
                              **({"loss": loss} if loss is not None else {}))
        write_jsonl(run.output / "val_predictions_before.jsonl", before.predictions)
        log.info("before training: %s", _format_metrics(before.metrics))


def _validate(run: Run, epoch: int, final: bool = False) -> None:
    """Caption the validation images and score them; a better score saves best/ (main process), a worse one counts
    towards early stopping. Every process keeps the same best/patience state (the gathered metrics are identical
    everywhere)."""
    state, step, output, t = run.state, run.step, run.output, run.cfg.train
    if not run.validation or (state["validated_step"] == step and not final):
        return  # an epoch end can coincide with an eval_every_steps step
    state["validated_step"] = step
    validation_started = time.perf_counter()
    # METEOR costs ~10 s of Java start-up per call: computed for the final validation only.
    result = evaluate(
        run.model, run.processor, run.validation, run.options, accelerator=run.accelerator,
        batch_size=run.cfg.eval.batch_size, num_workers=run.cfg.data.num_workers, desc=f"validating (step {step})",
        meteor=final,
    )
    loss = validation_loss(run.model, run.val_pairs, t.label_smoothing, run.accelerator)
    if loss is not None:
        result.metrics["loss"] = loss
    run.final_metrics = result.metrics
    score = selection_score(result.metrics, t.best_metric)
    improved = state["best_score"] is None or score > state["best_score"]
    state["stale_evals"] = 0 if improved else state["stale_evals"] + 1
    if improved:
        state.update(best_score=score, best_step=step)
    if run.main:
        run.metrics_log.write(step=step, epoch=epoch, split="validation", **result.metrics)
        run.accelerator.log({f"validation/{k}": v for k, v in result.metrics.items() if isinstance(v, float)},
                            step=step)
        write_jsonl(output / "val_predictions.jsonl", result.predictions)
        log.info("step %d validation: %s", step, _format_metrics(result.metrics))
        for warning in guard_warnings(result.metrics, images=len(result.predictions)):
            log.warning("step %d validation: %s", step, warning)
        if improved:
            # The report's gallery shows best/'s captions, not whichever model validated last.
            write_jsonl(output / "val_predictions_best.jsonl", result.predictions)
            keep_best_for_resume(output)  # a checkpoint may name the current best/: resume can put it back
            save_model(run.accelerator.unwrap_model(run.model), run.processor, output / "best",
                       {**run.settings, "step": step}, _card(run, result.metrics, step))
    run.accelerator.wait_for_everyone()
    run.validation_seconds += time.perf_counter() - validation_started


def _checkpoint(run: Run) -> None:
    run.checkpointed_step = run.step
    with quiet_tied_weights_note(run.accelerator.unwrap_model(run.model)):
        save_checkpoint(run.accelerator, run.output, run.step, {**run.state, "metrics_lines": run.metrics_log.lines},
                        run.cfg.train.keep_last, scheduler=run.scheduler)


def _patience_spent(run: Run) -> bool:
    patience = run.cfg.train.early_stopping_patience
    return bool(patience) and run.state["stale_evals"] >= patience


def _train_step(run: Run, window: list[dict], epoch: int, vision, scst, stop) -> bool:
    """One optimizer step over an accumulation window (caption loss or SCST), logged; returns whether any process
    has asked to stop (a signal).

    Raises:
        CaptuneError: a bad sample with data.on_bad_sample=error, or a non-finite loss with train.on_nonfinite=stop.
    """
    accelerator, model, t, state = run.accelerator, run.model, run.cfg.train, run.state
    for batch in window:
        _record_skips(batch.pop("skipped", []), state["skipped"], run.cfg.data.on_bad_sample)
    if scst is None:
        loss_sum, tokens, pairs = backward_window(
            accelerator, model, vision, window, label_smoothing=t.label_smoothing, seed=t.seed,
            epoch=epoch, first_batch=state["batch"])
    else:
        loss_sum, tokens, pairs = scst_backward_window(
            scst, accelerator, model, vision, window, processor=run.processor, seed=t.seed,
            epoch=epoch, first_batch=state["batch"])
    state["batch"] += len(window)
    run.seen += pairs * accelerator.num_processes
    run.pairs_trained += pairs * accelerator.num_processes
    run.step += 1
    step = run.step
    # One collective per step: every process agrees on the loss, a non-finite loss and a stop signal.
    loss_value, bad, signalled = _agree(accelerator, loss_sum, tokens, stop.requested is not None)
    if bad and t.on_nonfinite == "stop":
        last_good = latest_checkpoint(run.output)
        raise CaptuneError(
            f"loss is {loss_value} at step {step} (epoch {epoch}); stopped before updating the weights. "
            f"Last good checkpoint: {last_good or 'none'}. Lower train.lr (or use mixed_precision no) and "
            "rerun with --resume, or set train.on_nonfinite=skip", 1)
    if bad or loss_value is None:
        log.warning("%s at step %d: skipping this optimizer step", f"loss is {loss_value}" if bad
                    else "no usable training pair on any process", step)
    else:
        if t.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    rate = run.seen / max(time.perf_counter() - run.tick, 1e-9)
    run.bar.set_postfix(loss=f"{loss_value or 0:.3f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
    run.bar.update()
    # SCST: the step's mean sampled (and greedy) reward, agreed across processes.
    rewards = scst.meter.finish_step(accelerator) if scst else {}
    run.last_train = dict(step=step, epoch=epoch, split="train", loss=loss_value, lr=lr, samples_per_s=rate, **rewards)
    if step % t.log_every_steps == 0 or step in (1, run.total_steps):
        run.metrics_log.write(**run.last_train)
        accelerator.log({"train/loss": loss_value, "train/lr": lr,
                         **{f"train/{k}": v for k, v in rewards.items() if v is not None}}, step=step)
        run.seen, run.tick, run.last_train = 0, time.perf_counter(), None
    return signalled


def _stopped(run: Run, interrupted: str) -> TrainResult:
    """The end of a run a signal stopped: its checkpoint is saved; --resume goes on from it."""
    run.metrics_log.close()
    log.warning("stopped by %s at step %d; checkpoint saved in %s/checkpoints: continue with --resume",
                interrupted, run.step, run.output)
    settle_collectives(run.accelerator)
    run.accelerator.end_training()
    return TrainResult(output=run.output, steps=run.step, best_score=run.state["best_score"],
                       best_step=run.state["best_step"], interrupted=interrupted)


def _finish(run: Run) -> TrainResult:
    """The end of a run that trained to the end (or stopped early): the last training record, the final validation
    (with METEOR), a last checkpoint when they are kept, then the run directory's outputs."""
    t, accelerator, step = run.cfg.train, run.accelerator, run.step
    if _patience_spent(run):
        log.info("early stopping at step %d: no better %s in %d validations", step, t.best_metric,
                 t.early_stopping_patience)
    train_seconds = time.perf_counter() - run.loop_started - run.validation_seconds
    if run.last_train is not None:
        # The last step is always logged (early stopping can end a run between logging steps): a 15-step run that
        # logged steps 1 and 10 only drew a learning-rate curve that seemed to rise.
        run.metrics_log.write(**run.last_train)
    _validate(run, run.state["epoch"], final=True)
    if t.keep_checkpoints and run.checkpointed_step != step:
        _checkpoint(run)  # kept checkpoints end at the last step, so --resume with more epochs goes on from there
    run.metrics_log.close()
    skipped = run.state["skipped"]
    skipped = _unique(gather_object(skipped) if accelerator.num_processes > 1 else skipped)
    if run.main:
        _write_outputs(run, skipped, train_seconds)
    settle_collectives(accelerator)
    accelerator.end_training()
    return TrainResult(output=run.output, steps=step, best_score=run.state["best_score"],
                       best_step=run.state["best_step"], final_metrics=run.final_metrics,
                       checkpoints_kept=t.keep_checkpoints)


def _write_outputs(run: Run, skipped: list[dict], train_seconds: float) -> None:
    """Main process, at a clean finish: last/ (and best/ when nothing validated), summary.json, the report, and
    the checkpoints removed unless train.keep_checkpoints."""
    t, output, step, accelerator = run.cfg.train, run.output, run.step, run.accelerator
    if skipped:
        log.warning("%d bad sample(s) skipped; listed in %s", len(skipped), output / "summary.json")
    unwrapped = accelerator.unwrap_model(run.model)
    for name in ("last", "best") if run.state["best_score"] is None else ("last",):
        save_model(unwrapped, run.processor, output / name, {**run.settings, "step": step},
                   _card(run, run.final_metrics, step))
    vocab = unwrapped.config.get_text_config().vocab_size  # the caption loss's number of classes
    run_facts = {
        "wall_seconds": round(time.perf_counter() - run.started, 1), "train_seconds": round(train_seconds, 1),
        # Pairs this run trained on (a resumed run counts from its checkpoint) over the loop's wall time.
        "samples_per_s": round(run.pairs_trained / max(train_seconds, 1e-9), 2),
        "device": str(accelerator.device), "precision": accelerator.mixed_precision,
        "processes": accelerator.num_processes, "batch_size": run.batch_size,
        "peak_memory": peak_memory(accelerator.device), "versions": library_versions(),
        "data_git": data_commit(run.cfg.data.path), "label_smoothing": t.label_smoothing,
        "loss_floor": round(loss_floor(t.label_smoothing, vocab), 4),
    }
    write_json(output / "summary.json", {"steps": step, "best_step": run.state["best_step"],
                                         "best_score": run.state["best_score"], "best_metric": t.best_metric,
                                         "final_metrics": run.final_metrics, "skipped_samples": skipped,
                                         "data": run.data_counts, "run": run_facts})
    write_report(output)
    if not t.keep_checkpoints:
        # A clean finish leaves nothing to resume: best/ and last/ hold the models, the checkpoints only weight.
        shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)


def train(cfg: Config, *, model=None, processor=None, resume: bool = False, overwrite: bool = False,
          before=None) -> TrainResult:
    """Fine-tune a captioner as `cfg` says and write the run directory.

    Args:
        cfg: the configuration; fields it leaves unset (None) take the model family's defaults, and the resolved
            values are what RUN/config.yaml records.
        model, processor: an already loaded pair (the demo reuses its untrained model); loaded from cfg.model
            otherwise.
        resume: continue from the newest intact checkpoint in RUN/checkpoints/ (from scratch when none).
        overwrite: start afresh in an output directory that already holds a run (refused otherwise).
        before: the untrained model's `EvalResult` on the validation images, when the caller already has it (the
            demo): the report's "before" captions are then not decoded a second time.

    Returns:
        TrainResult with the run directory and the best validation score.

    Raises:
        CaptuneError: bad data, model or configuration (an unsupported model type before anything loads or any
            file is written), or a non-finite loss with `train.on_nonfinite: stop`.
    """
    cfg = resolved(cfg, model)
    t, output, started = cfg.train, Path(cfg.output), time.perf_counter()
    trackers = resolve_trackers(t.report_to)
    accelerator = _new_accelerator(cfg, output, trackers)
    main = accelerator.is_main_process
    _check_run_directory(output, resume, overwrite)
    accelerator.wait_for_everyone()  # every process has looked before the main one writes into the directory
    set_seed(t.seed)
    checkpoint = latest_checkpoint(output) if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no complete checkpoint in %s/checkpoints; starting from the beginning", output)
    data, skipped, validation = _load_data(cfg)
    model, processor = trainable_model(cfg, model, processor)
    family = family_of(model)
    if main:
        _start_run_directory(output, cfg, fresh=checkpoint is None)
        _announce(cfg, family, model, data, validation, skipped, accelerator)
    accelerator.wait_for_everyone()

    collator = CaptionCollator(processor, cfg.data.max_caption_tokens, cfg.data.prompt, family=family)
    batch_size = t.batch_size if t.batch_size != "auto" else find_batch_size(model, collator, accelerator)
    scst = None
    if t.objective == "scst":
        scst = build_scst(data.train, samples=t.scst_samples, baseline=t.scst_baseline, prompt=cfg.data.prompt,
                          max_new_tokens=cfg.eval.max_new_tokens, tokenize=collator.tokenize)
    train_collator = collator if scst is None else ScstCollator(
        lambda images: family.pixel_values(processor, images), processor)
    items, loader, sampler = training_loader(cfg, data.train, processor, train_collator, batch_size, accelerator)
    val_pairs = validation_pairs(cfg, validation, processor, collator, accelerator)
    streamed = sampler is None
    optimizer = torch.optim.AdamW(parameter_groups(model, t.weight_decay), lr=t.lr, fused=t.fused_adamw or None)
    if streamed:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    batches_per_epoch = items.batches(batch_size) if streamed else len(loader)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / t.grad_accum))
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    # Stepped by hand once per optimizer step (not prepared: Accelerate would step it once per process). Its state
    # goes into the checkpoint's JSON, not through register_for_checkpointing: Accelerate unpickles registered
    # objects with weights_only=False, so a shared checkpoint could run code on resume.
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=round(t.warmup_ratio * total_steps), num_training_steps=total_steps,
        min_lr_rate=t.min_lr_ratio,
    )
    state, step = _restored_state(accelerator, output, scheduler, skipped, checkpoint)
    metrics_log = MetricsLog(output / "metrics.jsonl", enabled=main, lines=state["metrics_lines"])
    if trackers:
        accelerator.init_trackers("captune", config=flat_config(cfg))
    options = eval_options(cfg)
    settings = {"base_model": cfg.model.name, "base_seed": t.seed, "mode": t.mode, "prompt": cfg.data.prompt,
                "max_caption_tokens": cfg.data.max_caption_tokens,
                "generation": {name: getattr(options, name) for name in RECORDED_OPTIONS}}
    data_counts = {"path": cfg.data.path, "train_images": len(data.train),
                   "train_captions": count_captions(data.train), "validation_images": len(validation),
                   "validation_captions": sum(len(s.captions) for s in validation)}
    run = Run(cfg=cfg, output=output, accelerator=accelerator, model=model, processor=processor, family=family,
              optimizer=optimizer, scheduler=scheduler, metrics_log=metrics_log, validation=validation,
              val_pairs=val_pairs, options=options, settings=settings, data_counts=data_counts, state=state,
              step=step, total_steps=total_steps, batch_size=batch_size, started=started)
    if validation and cfg.eval.caption_before and checkpoint is None:
        _caption_before(run, before)

    vision = family.vision_tower(accelerator.unwrap_model(model))  # where grouped batches repeat image embeddings
    interrupted = None
    run.tick = run.loop_started = time.perf_counter()
    model.train()
    run.bar = tqdm(total=total_steps, initial=step, desc="training", unit="step",
                   disable=not accelerator.is_local_main_process)
    with StopRequests() as stop:
        try:
            while state["epoch"] < epochs and run.step < total_steps and not _patience_spent(run) and not interrupted:
                epoch = state["epoch"]
                if streamed:
                    items.set_epoch(epoch)
                else:
                    sampler.set_order(epoch)
                seed_loader(loader.generator, t.seed, epoch)
                batches = accelerator.skip_first_batches(loader, state["batch"]) if state["batch"] else loader
                for window in accumulation_windows(batches, t.grad_accum):
                    signalled = _train_step(run, window, epoch, vision, scst, stop)
                    if t.eval_every_steps and run.step % t.eval_every_steps == 0 and run.step < total_steps:
                        _validate(run, epoch)
                    if run.step >= total_steps or _patience_spent(run):
                        break
                    # The epoch-end checkpoint, after validation, covers a periodic save falling on the last batch.
                    epoch_done = state["batch"] == batches_per_epoch
                    if signalled or (t.save_every_steps and run.step % t.save_every_steps == 0 and not epoch_done):
                        _checkpoint(run)
                    if signalled:
                        interrupted = stop.requested or "a signal on another process"
                        break
                else:
                    state.update(epoch=epoch + 1, batch=0)
                    # Validation at epoch ends unless it runs every N steps; every Nth epoch with eval_every_epochs.
                    if state["epoch"] < epochs and not t.eval_every_steps and state["epoch"] % t.eval_every_epochs == 0:
                        _validate(run, epoch)
                    _checkpoint(run)
        except BaseException:
            metrics_log.close()
            raise
        finally:
            run.bar.close()
    return _stopped(run, interrupted) if interrupted else _finish(run)



def _restore_newest_intact(accelerator, output: Path) -> tuple[Path, dict]:
    """Load the newest checkpoint that verifies and restores; a damaged one is named in a warning and skipped.

    Raises:
        CaptuneError: no checkpoint of the run can be restored (the newest one's reason is given).
    """
    reasons = []
    for checkpoint in reversed(checkpoint_dirs(output)):
        try:
            return checkpoint, load_checkpoint(accelerator, checkpoint)
        except CaptuneError as exc:
            reasons.append(str(exc))
            log.warning("%s; falling back to the previous checkpoint", exc)
    raise CaptuneError(f"--resume: no checkpoint in {output}/checkpoints can be restored ({reasons[0] if reasons else 'none'}); "
                       "rerun without --resume (and with --overwrite) to start over")


def backward_window(accelerator, model, vision, window: list[dict], *, label_smoothing: float, seed: int, epoch: int,
                    first_batch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward over one accumulation window, gradients synchronised after its last micro-batch.

    The step's loss is the mean over every caption token of the window on every process (the fix transformers'
    Trainer made in 2024 for gradient accumulation): each micro-batch's token losses are summed and divided by the
    window's total, so a short last window is not scaled down, a placeholder batch (no usable pair, see
    CaptionCollator: it still runs, as every process must take part in each step's collectives) weighs nothing, and
    a long caption weighs what it would in one big batch. DDP averages gradients over processes and
    `accelerator.backward` divides by grad_accum (always, even for a short window): the scale below undoes both.

    Args:
        vision: the unwrapped vision tower (grouped batches repeat its output rows, see speed.share_images).
        first_batch: the epoch position of the window's first micro-batch (seeds its dropout).

    Returns:
        (this process's summed token loss, detached; the window's caption tokens on all processes; usable pairs).
    """
    family = family_of(model)
    tokens = window_tokens(accelerator, window, family)
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / tokens.clamp(min=1)
    loss_sum, pairs = torch.zeros((), device=accelerator.device), 0
    for position, batch in enumerate(window):
        pairs += batch.pop("pairs")
        # The window is known up front, so the sync point is set here rather than by `accelerator.accumulate`, whose
        # end-of-loader detection fires as soon as the epoch's last batch is fetched, i.e. early in a prefetched
        # window. The prepared optimizer steps only when this is True (and DeepSpeed takes its accumulation boundary
        # from it, so a short window steps there too).
        accelerator.sync_gradients = position == len(window) - 1
        seed_micro_batch(seed, epoch, first_batch + position, accelerator.process_index)
        with (contextlib.nullcontext() if accelerator.sync_gradients else accelerator.no_sync(model),
              share_images(vision, batch.get("image_index"))):
            loss = batch_loss_sum(model, batch, label_smoothing)
            accelerator.backward(loss * scale)
        loss_sum = loss_sum + loss.detach()
    return loss_sum, tokens, pairs


def _agree(accelerator, loss_sum: torch.Tensor, tokens: torch.Tensor, stop: bool) -> tuple[float | None, bool, bool]:
    """(the step's loss: summed token losses over the window's `tokens` on all processes, or None when there were
    none; any loss non-finite; any process asked to stop): one device sync a step."""
    local = torch.stack([loss_sum.float(), (~torch.isfinite(loss_sum)).float(),
                         torch.tensor(float(stop), device=loss_sum.device)])
    if accelerator.num_processes > 1:
        every = accelerator.gather(local.unsqueeze(0))
        local = torch.stack([every[:, 0].sum(), every[:, 1].max(), every[:, 2].max()])
    total, bad, signalled = local.tolist()
    count = int(tokens.item())
    return (total / count if count else None), bad > 0, signalled > 0


def settle_collectives(accelerator) -> None:
    """Wait for every process, then let the collectives' worker threads finish before the process group can go.

    gloo's worker thread drops a finished collective's tensors after the caller already has its result, and needs
    the GIL for that. If the last reference to the process group (DDP's reducer, freed as train() returns) goes
    first, its destructor joins that thread while holding the GIL, and both wait forever: a two-process run that had
    written everything then hung at exit (seen under load, py-spy: ~ProcessGroupGloo joining a thread stuck in
    AsyncAllgatherWork's destructor waiting for the GIL). The pause releases the GIL so the thread can finish."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        time.sleep(0.5)


def _unique(items: list[dict]) -> list[dict]:
    """One entry per (id, reason): a bad image is met again every epoch, and once per caption."""
    seen, out = set(), []
    for item in items:
        key = (item["id"], item["reason"])
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _format_metrics(metrics: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float))
