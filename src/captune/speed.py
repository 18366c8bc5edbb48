"""Speed levers for BLIP: fused scaled-dot-product attention, int8 CPU inference, torch.compile, fused AdamW.

transformers (5.24) implements BLIP's attention eagerly only: it materialises the (batch, heads, query, key)
score matrix, softmaxes it and multiplies again, three passes over the largest activation of the vision tower
(577 x 577 per head at 384 px). `enable_sdpa` replaces the attention forward of each BLIP attention module with one
that calls `torch.nn.functional.scaled_dot_product_attention`, which fuses the three on CPU and GPU (flash /
memory-efficient kernels). Weights, state dicts, masks and the generation cache are untouched, so a model with SDPA
enabled saves, loads, trains and generates exactly as before; `disable_sdpa` restores the eager forward.

What changes: attention weights are no longer returned (`output_attentions` yields None for these modules).

`quantize_int8` is an opt-in inference lever for CPUs: dynamic int8 quantization of the nn.Linear layers (weights
stored as int8 per tensor, activations quantized per call), which carry nearly all of BLIP's FLOPs. Captions can
differ slightly from fp32 ones; see docs/serving.md for the measured speed and agreement.
"""

from __future__ import annotations

import logging
import types
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

from .errors import CaptuneError

log = logging.getLogger("captune")

_MARK = "_captune_sdpa"


def _vision_sdpa_forward(self: BlipAttention, hidden_states: torch.Tensor, **kwargs):
    """BlipAttention.forward (ViT self-attention, no mask) with a fused attention kernel."""
    bsz, tgt_len, embed_dim = hidden_states.size()
    qkv = self.qkv(hidden_states).reshape(bsz, tgt_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    context = F.scaled_dot_product_attention(
        qkv[0], qkv[1], qkv[2], dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale
    )
    context = context.transpose(1, 2).reshape(bsz, tgt_len, embed_dim)
    return self.projection(context), None


def _text_sdpa_forward(
    self: BlipTextSelfAttention,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    cache=None,
    **kwargs,
):
    """BlipTextSelfAttention.forward (decoder self- or cross-attention) with a fused attention kernel.

    The mask handling and the cache bookkeeping are transformers' own, line for line: the additive 4-D mask built by
    BlipTextModel (causal + padding) goes to SDPA as `attn_mask`; cross-attention keys/values are computed once per
    generation and reused from the EncoderDecoderCache.
    """
    if cache is None and "past_key_values" in kwargs:  # the deprecated name, still accepted upstream until 5.40
        cache = kwargs.pop("past_key_values")
    input_shape = hidden_states.shape[:-1]
    query = self.query(hidden_states).view(*input_shape, -1, self.attention_head_size).transpose(1, 2)
    is_cross_attention = encoder_hidden_states is not None
    attention_mask = encoder_attention_mask if is_cross_attention else attention_mask

    is_updated = False
    current_cache = cache
    if cache is not None and isinstance(cache, EncoderDecoderCache):
        is_updated = cache.is_updated.get(self.layer_idx)
        current_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache
    current_states = encoder_hidden_states if is_cross_attention else hidden_states
    if is_cross_attention and cache is not None and is_updated:
        key = current_cache.layers[self.layer_idx].keys
        value = current_cache.layers[self.layer_idx].values
    else:
        kv_shape = (*current_states.shape[:-1], -1, self.attention_head_size)
        key = self.key(current_states).view(kv_shape).transpose(1, 2)
        value = self.value(current_states).view(kv_shape).transpose(1, 2)
        if cache is not None:
            key, value = current_cache.update(key, value, self.layer_idx, kwargs=kwargs)
            if is_cross_attention and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True

    if attention_mask is not None:
        attention_mask = attention_mask.to(device=query.device)
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(query.dtype)
    context = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=self.dropout.p if self.training else 0.0
    )
    context = context.transpose(1, 2).reshape(*input_shape, self.all_head_size)
    return context, None


def enable_sdpa(model: torch.nn.Module) -> int:
    """Switch every BLIP attention module of `model` (vision and text, self- and cross-attention) to SDPA.

    Works on a BlipForConditionalGeneration or any module containing BLIP attention (a PEFT wrapper, a bare
    vision model); idempotent.

    Args:
        model: the model, modified in place.

    Returns:
        The number of attention modules switched (0 when the model holds no BLIP attention).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, BlipAttention):
            forward = _vision_sdpa_forward
        elif isinstance(module, BlipTextSelfAttention):
            forward = _text_sdpa_forward
        else:
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
    """The towers `quantize_int8` quantizes: the vision transformer and the text decoder's transformer layers.

    The LM head (`text_decoder.cls`, whose output layer shares its weight with the word embeddings) stays fp32: its
    logits pick the next word directly, so its rounding flips choices most. Quantizing it as well was about 10% faster
    in one greedy trial on full-size BLIP-base (8 images: 4.0 s vs 4.5 s; fp32 9.9 s) but left fewer beam-3 captions
    identical to fp32 on a briefly trained tiny model (95% vs 98%); see benchmarks/RESULTS.md.
    """
    return {"vision_model": model.vision_model, "text_decoder.bert": model.text_decoder.bert}


def int8_quantized(model: torch.nn.Module) -> bool:
    """True when `quantize_int8` has been applied to `model` (some Linear layer is dynamic int8)."""
    return any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of the Linear layers of BLIP's vision tower and text decoder, for CPU inference.

    In place: each targeted nn.Linear becomes a `torch.ao.nn.quantized.dynamic.Linear` (int8 weights, activations
    quantized per call). Attention modules keep their forward, so SDPA (`enable_sdpa`) applies before or after.
    Inference only: the quantized layers have no gradients, and the model can no longer be saved as a BLIP checkpoint.

    Args:
        model: a BlipForConditionalGeneration on the CPU (LoRA merged, as `load_model_and_processor` returns it).

    Returns:
        The same model, in eval mode.

    Raises:
        CaptuneError: the model is not on the CPU.
    """
    require_cpu_for_int8(next(model.parameters()).device)
    model.eval()
    with warnings.catch_warnings():
        # torch 2.13 deprecates torch.ao.quantization in favour of torchao (not a dependency here); the API still
        # works, and two multi-line warnings per call would bury the user's output.
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        for tower in int8_targets(model).values():
            torch.ao.quantization.quantize_dynamic(tower, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def apply_speed_levers(model: torch.nn.Module, *, sdpa: bool, compile: bool) -> torch.nn.Module:
    """Apply the configured levers to a freshly loaded model (training and captioning share this).

    Args:
        model: the BLIP model, modified in place.
        sdpa: fused attention (see module docstring); False restores eager attention.
        compile: `torch.compile` the model's forward in place (`nn.Module.compile`), so the module, its state dict
            and save_pretrained stay as they are; generation calls submodules and stays eager.

    Returns:
        The same model.
    """
    if sdpa:
        log.debug("SDPA attention on %d BLIP attention modules", enable_sdpa(model))
    else:
        disable_sdpa(model)
    if compile:
        # Dynamic shapes: dynamic padding gives every batch its own caption length, and static compilation would
        # recompile for each new one (20-35 s a step on CPU in a tiny-model trial); dynamic compiled one graph for 8
        # different lengths in a tiny-model trial (53 s once, then 0.1 s steps).
        model.compile(dynamic=True)
    return model


@contextmanager
def share_images(vision_model: torch.nn.Module, image_index: torch.Tensor | None):
    """While active, the vision tower's output rows are repeated as `image_index` says: a batch carries each image
    once and its caption rows point at it (grouped caption sampling), so the ViT, ~85% of a training step's FLOPs,
    runs once per image, and the backward sums each image's gradient over its captions.

    A forward hook rather than calling the towers by hand: the model is still called through its (DDP, FSDP...)
    wrapper, which must see the forward for gradient synchronisation to work.
    """
    if image_index is None:
        yield
        return

    def expand(module, args, output):
        output.last_hidden_state = output.last_hidden_state.index_select(0, image_index)
        return output

    handle = vision_model.register_forward_hook(expand)
    try:
        yield
    finally:
        handle.remove()


class SharedCrossAttentionCache(EncoderDecoderCache):
    """The decoder cache for beam search over images: reorders self-attention only.

    Every step, beam search reorders the cache along the (image x beam) rows. BLIP's cross-attention keys and values
    (577 image tokens x 12 layers at 384 px) are the same for all beams of one image, and the reorder never moves a
    row to another image, so reordering them copies ~2 GB a step at batch 16 x 3 beams to leave the values exactly as
    they were. Measured on the 2-core CPU (full-size, int8, 8 images, beam 3, 20 tokens): those copies were 48% of
    the time (`aten::index_select`, torch.profiler).
    """

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)


def beam_search_cache() -> EncoderDecoderCache:
    """A fresh cache for one `generate()` call with num_beams > 1 (see SharedCrossAttentionCache)."""
    return SharedCrossAttentionCache(DynamicCache(), DynamicCache())
