"""Load any supported captioner and its processor: a hub id, a local directory, a LoRA adapter, or a tiny preset.

Which architecture a name holds is read from its config.json (`captune.models.family_for`) before any weights load;
the family module loads it. This module adds what every family shares: LoRA adapter directories (base rebuilt from
captune.json, adapter merged in), SDPA, and captune.json settings.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import CaptuneError
from .models import (  # noqa: F401  (re-exported: callers read settings and probe the Hub through here)
    ADAPTER_CONFIG, DEFAULT_MODEL, SETTINGS_FILE, TINY, base_of_adapter, family_for, hub_reachable,
    load_captune_settings,
)

log = logging.getLogger("captune")


def load_model_and_processor(name: str, *, seed: int = 0, sdpa: bool = True):
    """Load model and processor.

    Args:
        name: a preset (`tiny`...), a local directory written by `save_pretrained` (a LoRA adapter directory too:
            its base model, named in captune.json, is loaded and the adapter merged in), or a Hugging Face hub id.
        seed: seeds the random initialisation of a preset.
        sdpa: run attention through fused scaled-dot-product attention (`captune.speed.enable_sdpa`) where the
            family has it: same numbers, faster; False keeps transformers' eager attention.

    Raises:
        CaptuneError: an unsupported model_type (before any weights load), missing or unexpected weights, or a hub
            id that cannot be fetched (offline or unknown).
    """
    from .speed import enable_sdpa

    family = family_for(name)  # refuses unsupported model types before anything heavy happens
    path = Path(name).expanduser()
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        model, processor = _from_adapter(path)
    elif path.is_dir():
        model, processor = _from_pickled_or_safe(family, path, seed)
    else:
        model, processor = family.load(name, seed=seed)
    if sdpa:
        enable_sdpa(model)
    return model, processor


def _from_pickled_or_safe(family, path: Path, seed: int):
    """A local model directory; pickled weights (pytorch_model.bin) are named in a warning, and refused clearly
    when they hold anything but tensors.

    transformers prefers model.safetensors when both are present, and reads .bin files with torch's weights-only
    unpickler, so no code runs either way; what this adds is saying so, instead of loading silently or failing
    with a page of torch.load advice.
    """
    import pickle

    pickled = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickled and not any(path.glob("model*.safetensors")):
        log.warning("%s holds pickled weights (%s), not safetensors: loading them with PyTorch's weights-only "
                    "unpickler; `captune export %s --output DIR` writes a safetensors copy", path,
                    ", ".join(pickled), path)
    try:
        return family.load(str(path), seed=seed)
    except pickle.UnpicklingError as exc:
        raise CaptuneError(
            f"{path}: {', '.join(pickled) or 'the weights file'} holds Python objects besides tensors, which captune "
            "refuses to unpickle (that can run arbitrary code); use a model directory with model.safetensors, or "
            "convert this one on a machine where you trust its origin"
        ) from exc


def _from_adapter(path: Path):
    """A LoRA run's best/ or last/: rebuild the base model named in captune.json, put the adapter on, merge."""
    from transformers import AutoProcessor

    from .finetune import load_adapter

    base, seed = base_of_adapter(path)
    model, base_processor = load_model_and_processor(base, seed=seed, sdpa=False)
    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):  # an adapter saved without its processor: the base's is the same
        processor = base_processor
    if type(processor) is not type(base_processor):
        processor = base_processor
    return load_adapter(model, str(path), merge=True), processor


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
