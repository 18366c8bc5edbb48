"""Pieces every family shares: the ignored-label value, the shifted caption loss, and the SDPA switch for
attention modules transformers already implements with SDPA."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def caption_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Next-token cross entropy summed over caption tokens; -100 labels (pads, prompt, image tokens) are ignored.

    `logits[:, t]` predicts `labels[:, t + 1]` (labels aligned with input_ids, as transformers' causal LMs take
    them). Computed here rather than by the model so label smoothing is a training option, not a property of the
    saved config (transformers' BLIP reads it from `text_config.label_smoothing`, default 0).
    """
    shifted = logits[:, :-1, :].float()
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing, reduction="sum",
    )


def caption_sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log p of each row's caption tokens: `caption_loss_sum`'s positions without smoothing, summed per row (rows,)."""
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return nll.view_as(targets).sum(dim=1)


def target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Caption tokens `caption_loss_sum` is taken over (labels shifted by one, -100 left out)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """`caption_loss_sum` averaged over the batch's caption tokens."""
    # 0 (not 0/0) for a placeholder batch with no token: no host sync either way.
    return caption_loss_sum(logits, labels, label_smoothing) / target_tokens(labels).clamp(min=1)


def mean_loss(family, model, batch: dict, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """A family's loss averaged over the batch's target tokens (its `loss_sum` / `target_tokens`)."""
    return family.loss_sum(model, batch, label_smoothing=label_smoothing) / family.target_tokens(batch).clamp(min=1)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _attention(config, implementation: str):
    previous = config._attn_implementation
    config._attn_implementation_internal = implementation
    try:
        yield
    finally:
        config._attn_implementation_internal = previous


def native_sdpa_forward(module, class_names: tuple[str, ...]):
    """A forward for `module` that runs its own forward with `config._attn_implementation` switched to "sdpa" for
    the call, when its class is one of `class_names` (transformers attention modules that read that setting on every
    call, so SDPA is theirs); None for any other module. The families whose attention is native SDPA (BLIP-2,
    PaliGemma, SmolVLM) use it as their `sdpa_forward`."""
    if type(module).__name__ not in class_names or not hasattr(module, "config"):
        return None
    eager = type(module).forward

    def forward(self, *args, **kwargs):
        with _attention(self.config, "sdpa"):
            return eager(self, *args, **kwargs)

    return forward
