"""The training loop: Accelerate, AdamW, warmup + cosine, validation, best/ and last/."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from .config import Config, save_config
from .data import build_dataset
from .data.collate import IGNORE_INDEX, CaptionCollator, CaptionPairs
from .errors import CaptuneError
from .evaluate import evaluate, write_json, write_jsonl
from .generate import GenerationOptions
from .model import SETTINGS_FILE, count_parameters, load_model_and_processor
from .speed import apply_speed_levers

log = logging.getLogger("captune")


@dataclass
class TrainResult:
    output: Path
    steps: int
    best_score: float | None
    best_step: int | None
    final_metrics: dict = field(default_factory=dict)
    """Validation metrics of the last evaluation (empty without validation data)."""


def resolve_mixed_precision(mode: str) -> str:
    """`auto`: bf16 where the GPU supports it, fp16 on older GPUs, fp32 ("no") on CPU, where autocast is slower."""
    if mode != "auto":
        return mode
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices, never biases or normalisation weights (1-D parameters)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or name.endswith(".bias") else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Next-token cross entropy averaged over caption tokens; -100 labels (pads, prompt) are ignored.

    Computed here rather than by the model so label smoothing is a training option, not a property of the saved
    config (transformers' BLIP reads it from `text_config.label_smoothing`, default 0).
    """
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


def eval_options(cfg: Config) -> GenerationOptions:
    return GenerationOptions(
        num_beams=cfg.eval.num_beams, max_new_tokens=cfg.eval.max_new_tokens,
        min_new_tokens=cfg.eval.min_new_tokens, prompt=cfg.data.prompt,
    )


def selection_score(metrics: dict, best_metric: str) -> float:
    """The number best/ is chosen by: one metric, or a `+`-joined sum (e.g. `cider+bleu_4`)."""
    total = 0.0
    for key in best_metric.split("+"):
        if metrics.get(key) is None:
            raise CaptuneError(f"train.best_metric: validation produced no '{key}' (have: {', '.join(metrics)})")
        total += metrics[key]
    return total


def save_model(model, processor, directory: Path, settings: dict | None = None) -> None:
    """save_pretrained (safetensors) of model and processor, via a temporary directory then a rename.

    `settings` (prompt, generation options) go to captune.json beside them, so `captune caption` and `eval`
    decode as training validated.
    """
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    if settings is not None:
        write_json(tmp / SETTINGS_FILE, settings)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


class MetricsLog:
    """Appends one JSON object a line to RUN/metrics.jsonl (main process only), flushed each line."""

    def __init__(self, path: Path, enabled: bool):
        self.handle = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, **record) -> None:
        if self.handle:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle:
            self.handle.close()


def train(cfg: Config, *, model=None, processor=None) -> TrainResult:
    """Fine-tune a BLIP captioner as `cfg` says and write the run directory.

    Args:
        cfg: the resolved configuration.
        model, processor: an already loaded pair (the demo reuses its untrained model); loaded from cfg.model
            otherwise.

    Returns:
        TrainResult with the run directory and the best validation score.

    Raises:
        CaptuneError: bad data, model or configuration.
    """
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
    )
    main = accelerator.is_main_process
    set_seed(cfg.train.seed)
    output = Path(cfg.output)
    data = build_dataset(cfg.data.path, cfg.data.val_split, cfg.train.seed)
    validation = data.validation[: cfg.data.max_val_images or None]
    if model is None:
        model, processor = load_model_and_processor(cfg.model.name, seed=cfg.train.seed)
    apply_speed_levers(model, sdpa=cfg.train.sdpa, compile=cfg.train.compile)
    if main:
        output.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output / "config.yaml")
        trainable, total = count_parameters(model)
        log.info(
            "training %s on %d images (%d captions), validating on %d images; %s of %s parameters trainable; "
            "%s on %d process(es), precision %s",
            cfg.model.name, len(data.train), sum(len(s.captions) for s in data.train), len(validation),
            f"{trainable:,}", f"{total:,}", accelerator.device, accelerator.num_processes, accelerator.mixed_precision,
        )
        if not validation:
            log.warning("no validation data (no validation/ folder, data.val_split 0): best/ will be the last model")

    collator = CaptionCollator(processor, cfg.data.max_caption_tokens, cfg.data.prompt)
    loader = DataLoader(
        CaptionPairs(data.train), batch_size=cfg.train.batch_size, shuffle=True, collate_fn=collator,
        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, fused=cfg.train.fused_adamw or None
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.train.grad_accum))
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    # Stepped by hand once per optimizer step (not prepared: Accelerate would step it once per process).
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=round(cfg.train.warmup_ratio * total_steps), num_training_steps=total_steps,
        min_lr_rate=cfg.train.min_lr_ratio,
    )
    metrics_log = MetricsLog(output / "metrics.jsonl", enabled=main)
    options = eval_options(cfg)
    settings = {"base_model": cfg.model.name, "prompt": cfg.data.prompt,
                "max_caption_tokens": cfg.data.max_caption_tokens,
                "generation": {"num_beams": options.num_beams, "max_new_tokens": options.max_new_tokens,
                               "min_new_tokens": options.min_new_tokens}}
    best = {"score": None, "step": None}
    final_metrics: dict = {}

    def validate(step: int, epoch: int, final: bool = False) -> None:
        nonlocal final_metrics
        if not validation:
            return
        # METEOR costs ~10 s of Java start-up per call: computed for the final validation only.
        result = evaluate(
            model, processor, validation, options, accelerator=accelerator, batch_size=cfg.eval.batch_size,
            num_workers=cfg.data.num_workers, desc=f"validating (step {step})", meteor=final,
        )
        final_metrics = result.metrics
        score = selection_score(result.metrics, cfg.train.best_metric)
        if main:
            metrics_log.write(step=step, epoch=epoch, split="validation", **result.metrics)
            write_jsonl(output / "val_predictions.jsonl", result.predictions)
            log.info("step %d validation: %s", step, _format_metrics(result.metrics))
            if best["score"] is None or score > best["score"]:
                best.update(score=score, step=step)
                save_model(accelerator.unwrap_model(model), processor, output / "best", settings)
        accelerator.wait_for_everyone()

    step, seen, tick = 0, 0, time.perf_counter()
    model.train()
    bar = tqdm(total=total_steps, desc="training", unit="step", disable=not accelerator.is_local_main_process)
    for epoch in range(epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                outputs = model(
                    pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                )
                loss = caption_loss(outputs.logits, batch["labels"], cfg.train.label_smoothing)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            seen += batch["input_ids"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            loss_value = loss.item()  # note: a device sync, once per optimizer step
            if not math.isfinite(loss_value):
                raise CaptuneError(f"loss is {loss_value} at step {step}: lower train.lr or use mixed_precision no", 1)
            rate = seen / max(time.perf_counter() - tick, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
            bar.update()
            if step % cfg.train.log_every_steps == 0 or step == 1:
                metrics_log.write(step=step, epoch=epoch, split="train", loss=loss_value, lr=lr, samples_per_s=rate)
                seen, tick = 0, time.perf_counter()
            if cfg.train.eval_every_steps and step % cfg.train.eval_every_steps == 0 and step < total_steps:
                validate(step, epoch)
            if step >= total_steps:
                break
        if step >= total_steps or epoch == epochs - 1:
            break
        validate(step, epoch)
    bar.close()
    validate(step, epochs - 1, final=True)
    if main:
        unwrapped = accelerator.unwrap_model(model)
        save_model(unwrapped, processor, output / "last", settings)
        if best["score"] is None:
            save_model(unwrapped, processor, output / "best", settings)
        write_json(output / "summary.json", {"steps": step, "best_step": best["step"], "best_score": best["score"],
                                             "best_metric": cfg.train.best_metric, "final_metrics": final_metrics})
    metrics_log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output=output, steps=step, best_score=best["score"], best_step=best["step"],
                       final_metrics=final_metrics)


def _format_metrics(metrics: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float))
