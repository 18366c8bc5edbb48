"""Fine-tuning modes: what trains (everything, all but the vision encoder, or LoRA adapters), and memory savers.

What each mode trains and where LoRA goes are the model family's answers (`captune.models`); this module applies
them.

LoRA goes through peft. Adapter directories (written by a LoRA run's best/ and last/) hold only the adapter; the
base model is named in captune.json (`base_model`, plus `base_seed` for the random `tiny` preset), so
`model.load_model_and_processor` can rebuild base + adapter and merge them for inference.
"""

from __future__ import annotations

import logging
import re

import torch
from PIL import Image

from .errors import CaptuneError
from .models import family_of
from .models.common import mean_loss

log = logging.getLogger("captune")

ADAPTER_CONFIG = "adapter_config.json"


def apply_mode(model, mode: str, *, lora_rank: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05,
               lora_targets: str | None = None, lora_vision: bool = False):
    """Set which parameters train; for `lora`, wrap the model in a peft model with fresh adapters.

    Args:
        model: a captioner of a supported family (its family says what each mode trains).
        mode: `full`, `frozen-vision`, `lora` (or a family-specific mode).
        lora_*: LoRA rank, alpha, dropout, comma-separated target Linear names (None = the family's default), and
            whether to adapt the vision encoder too.

    Returns:
        The model to train (the same object, or a peft wrapper around it for `lora`).

    Raises:
        CaptuneError: a mode the family does not support, or LoRA targets that match no module.
    """
    family = family_of(model)
    if mode != "lora":
        family.set_trainable(model, mode)
        return model
    from peft import LoraConfig, get_peft_model

    lora_targets = lora_targets or family.defaults("")["train.lora_targets"]
    targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
    pattern = family.lora_pattern(targets, lora_vision)
    if not any(re.fullmatch(pattern, name) for name, _ in model.named_modules()):
        raise CaptuneError(
            f"train.lora_targets {lora_targets!r} matches no Linear of this {family.NAME} model's attention: "
            f"use names among {family.LORA_TARGET_NAMES}"
        )
    config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=pattern,
                        bias="none")
    return get_peft_model(model, config)


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations during backward. Non-reentrant, so frozen inputs (LoRA) still get gradients."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name; the old one warns
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_adapter_dir(path) -> bool:
    from pathlib import Path

    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(base_model, adapter_dir: str, merge: bool = True):
    """Put a saved LoRA adapter on `base_model`; merged into plain weights unless `merge` is False.

    Raises:
        CaptuneError: the adapter does not fit the base model (another architecture or size).
    """
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base_model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CaptuneError(f"LoRA adapter in {adapter_dir} does not fit its base model: {str(exc).splitlines()[0]}") from exc
    return model.merge_and_unload() if merge else model


def unwrap_peft(model):
    """The plain transformers model under a peft wrapper, with adapters merged in (a copy-free merge)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def describe_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; for peft models the total counts base weights once."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def freeze_summary(model: torch.nn.Module) -> str:
    trainable, total = describe_parameters(model)
    return f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / max(total, 1):.2f}%)"


AUTO_BATCH_START = 256


def find_batch_size(model, collator, accelerator, start: int = AUTO_BATCH_START) -> int:
    """`--batch-size auto`: the largest batch (halving from `start`) whose forward + backward fits on the GPU.

    Probes with the longest captions the collator allows and with AdamW's two moment buffers already allocated, so
    the first real steps cannot need more. Processes agree on the smallest size found.

    Raises:
        CaptuneError: not on a GPU (CPU memory is not probed: pass a number), or not even batch 1 fits.
    """
    if accelerator.device.type != "cuda":
        raise CaptuneError("--batch-size auto probes GPU memory and needs a GPU; on CPU pass a number, e.g. --batch-size 16")
    model.to(accelerator.device)
    family = family_of(accelerator.unwrap_model(model))
    # Stand-ins for AdamW's exp_avg / exp_avg_sq, which exist from the first optimizer step on.
    reserve = [torch.empty_like(p) for p in model.parameters() if p.requires_grad for _ in range(2)]
    # Images are all resized to one size, so a blank one probes as well as a real one (and needs no readable first
    # sample, nor random access into a stream); a caption of max_caption_tokens is the longest a batch can get.
    side = family.image_size(collator.processor)
    item = {"image": Image.new("RGB", (side, side)), "caption": "word " * collator.max_tokens}

    def fits(batch_size: int) -> bool:
        batch = {k: v.to(accelerator.device) for k, v in collator([item] * batch_size).items()
                 if isinstance(v, torch.Tensor)}
        with accelerator.autocast():
            loss = mean_loss(family, model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return True

    size = probe_batch_size(fits, start)
    del reserve
    torch.cuda.empty_cache()
    if accelerator.num_processes > 1:
        size = int(accelerator.gather(torch.tensor([size], device=accelerator.device)).min().item())
    log.info("--batch-size auto: %d per process", size)
    return size


def probe_batch_size(fits, start: int) -> int:
    """Shrink from `start` until `fits(batch_size)` runs without an out-of-memory error (Accelerate's helper)."""
    from accelerate.utils import find_executable_batch_size

    @find_executable_batch_size(starting_batch_size=start)
    def probe(batch_size: int) -> int:
        fits(batch_size)
        return batch_size

    try:
        return probe()
    except RuntimeError as exc:
        if "No executable batch size found" in str(exc):
            raise CaptuneError("--batch-size auto: not even batch 1 fits in GPU memory; try train.mode=lora, "
                               "train.gradient_checkpointing=true or mixed precision bf16") from exc
        raise
