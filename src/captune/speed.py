"""Speed levers: fused scaled-dot-product attention, int8 CPU inference, torch.compile, one ViT pass per image.

Which levers apply to a model is its family's answer (`captune.models`, SPEED_LEVERS): `enable_sdpa` binds the
family's SDPA attention forwards in place of transformers' eager ones (weights, state dicts, masks and the
generation cache untouched, so a model with SDPA enabled saves, loads, trains and generates exactly as before;
`disable_sdpa` restores the eager forward). What changes: attention weights are no longer returned.

`quantize_int8` is an opt-in inference lever for CPUs: dynamic int8 quantization of the nn.Linear layers of the
family's `int8_targets` (weights stored as int8 per tensor, activations quantized per call), which carry nearly all
of the FLOPs. Captions can differ slightly from fp32 ones; see docs/serving.md for the measured speed and agreement.
"""

from __future__ import annotations

import logging
import types
import warnings
from contextlib import contextmanager

import torch

from .errors import CaptuneError
from .models import all_sdpa_forward, family_of

log = logging.getLogger("captune")

_MARK = "_captune_sdpa"


def enable_sdpa(model: torch.nn.Module) -> int:
    """Switch every attention module of `model` that a family has an SDPA forward for.

    Works on a whole model or any module containing such attention (a PEFT wrapper, a bare vision model); idempotent.

    Args:
        model: the model, modified in place.

    Returns:
        The number of attention modules switched (0 when the model holds none a family knows).
    """
    count = 0
    for module in model.modules():
        forward = all_sdpa_forward(module)
        if forward is None:
            continue
        # An instance attribute shadows the class's forward; nn.Module.__call__ looks it up on the instance.
        module.forward = types.MethodType(forward, module)
        setattr(module, _MARK, True)
        count += 1
    return count


def disable_sdpa(model: torch.nn.Module) -> int:
    """Restore transformers' eager attention on every module `enable_sdpa` switched; returns how many."""
    count = 0
    for module in model.modules():
        if getattr(module, _MARK, False):
            del module.forward
            delattr(module, _MARK)
            count += 1
    return count


def sdpa_enabled(model: torch.nn.Module) -> bool:
    """True when any attention module of `model` runs through SDPA."""
    return any(getattr(module, _MARK, False) for module in model.modules())


def require_cpu_for_int8(device: torch.device | str) -> None:
    """Raise unless `device` is the CPU: the dynamic int8 kernels (fbgemm/qnnpack) exist for CPUs only.

    Raises:
        CaptuneError: `device` is a GPU (or any other non-CPU device).
    """
    device = torch.device(device)
    if device.type != "cpu":
        raise CaptuneError(f"int8 quantization runs on the CPU only, but the model is on {device}; drop --int8 "
                           "(int8=False) on a GPU, or pass --device cpu")


def int8_targets(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The submodules `quantize_int8` quantizes, as the model's family names them."""
    return family_of(model).int8_targets(model)


def int8_quantized(model: torch.nn.Module) -> bool:
    """True when `quantize_int8` has been applied to `model` (some Linear layer is dynamic int8)."""
    return any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of the Linear layers of the family's `int8_targets`, for CPU inference.

    In place: each targeted nn.Linear becomes a `torch.ao.nn.quantized.dynamic.Linear` (int8 weights, activations
    quantized per call). Attention modules keep their forward, so SDPA (`enable_sdpa`) applies before or after.
    Inference only: the quantized layers have no gradients, and the model can no longer be saved as a checkpoint.

    Args:
        model: a loaded captioner on the CPU (LoRA merged, as `load_model_and_processor` returns it).

    Returns:
        The same model, in eval mode.

    Raises:
        CaptuneError: the model is not on the CPU, or its family has no int8 lever.
    """
    require_cpu_for_int8(next(model.parameters()).device)
    family = family_of(model)
    if "int8" not in family.SPEED_LEVERS:
        raise CaptuneError(f"--int8 is not available for {family.NAME} models: drop --int8")
    model.eval()
    with warnings.catch_warnings():
        # torch 2.13 deprecates torch.ao.quantization in favour of torchao (not a dependency here); the API still
        # works, and two multi-line warnings per call would bury the user's output.
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        for tower in family.int8_targets(model).values():
            torch.ao.quantization.quantize_dynamic(tower, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def apply_speed_levers(model: torch.nn.Module, *, sdpa: bool, compile: bool) -> torch.nn.Module:
    """Apply the configured levers to a freshly loaded model (training and captioning share this).

    Args:
        model: the model, modified in place.
        sdpa: fused attention (see module docstring); False restores eager attention.
        compile: `torch.compile` the model's forward in place (`nn.Module.compile`), so the module, its state dict
            and save_pretrained stay as they are; generation calls submodules and stays eager.

    Returns:
        The same model.
    """
    if sdpa:
        log.debug("SDPA attention on %d attention modules", enable_sdpa(model))
    else:
        disable_sdpa(model)
    if compile:
        # Dynamic shapes: dynamic padding gives every batch its own caption length, and static compilation would
        # recompile for each new one (20-35 s a step on CPU in a tiny-model trial); dynamic compiled one graph for 8
        # different lengths in a tiny-model trial (53 s once, then 0.1 s steps).
        model.compile(dynamic=True)
    return model


@contextmanager
def share_images(vision_model: torch.nn.Module | None, image_index: torch.Tensor | None):
    """While active, the vision tower's output rows are repeated as `image_index` says: a batch carries each image
    once and its caption rows point at it (grouped caption sampling), so the ViT, ~85% of a training step's FLOPs,
    runs once per image, and the backward sums each image's gradient over its captions.

    A forward hook rather than calling the towers by hand: the model is still called through its (DDP, FSDP...)
    wrapper, which must see the forward for gradient synchronisation to work.
    """
    if image_index is None:
        yield
        return
    if vision_model is None:
        raise CaptuneError("grouped caption sampling is not available for this model family: use "
                           "data.caption_sampling all or random")

    def expand(module, args, output):
        output.last_hidden_state = output.last_hidden_state.index_select(0, image_index)
        return output

    handle = vision_model.register_forward_hook(expand)
    try:
        yield
    finally:
        handle.remove()
