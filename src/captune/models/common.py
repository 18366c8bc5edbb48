"""Pieces every family shares: the ignored-label value and the shifted caption loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Next-token cross entropy averaged over caption tokens; -100 labels (pads, prompt, image tokens) are ignored.

    `logits[:, t]` predicts `labels[:, t + 1]` (labels aligned with input_ids, as transformers' causal LMs take
    them). Computed here rather than by the model so label smoothing is a training option, not a property of the
    saved config (transformers' BLIP reads it from `text_config.label_smoothing`, default 0).
    """
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    total = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing, reduction="sum",
    )
    # The mean over caption tokens, and 0 (not 0/0) for a placeholder batch with none: no host sync either way.
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
