"""BLIP's attention through fused scaled-dot-product attention, and its beam-search cache.

transformers (5.24) implements BLIP's attention eagerly only: it materialises the (batch, heads, query, key)
score matrix, softmaxes it and multiplies again, three passes over the largest activation of the vision tower
(577 x 577 per head at 384 px). `sdpa_forward(module)` gives each BLIP attention module a forward that calls
`torch.nn.functional.scaled_dot_product_attention`, which fuses the three on CPU and GPU (flash / memory-efficient
kernels); `captune.speed.enable_sdpa` binds it. Weights, state dicts, masks and the generation cache are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention


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


def sdpa_forward(module: torch.nn.Module):
    """The SDPA forward for a BLIP attention module (ViT self-attention; decoder self- and cross-attention), else
    None."""
    if isinstance(module, BlipAttention):
        return _vision_sdpa_forward
    if isinstance(module, BlipTextSelfAttention):
        return _text_sdpa_forward
    return None


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
