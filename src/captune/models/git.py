"""GIT (`GitForCausalLM`): the family contract of `captune.models` for GIT captioners (microsoft/git-base...).

GIT is one transformer decoder over `[image tokens] [CLS] caption [SEP]`: a CLIP ViT encodes the image, a projection
maps its tokens into the text width, and the model prepends them to the text embeddings *inside* its forward. Image
tokens attend to each other bidirectionally, text attends causally to the image and earlier text. There is no
cross-attention, so the beam cross-attention cache does not apply.

The caption objective as GIT's own loss computes it:
    input_ids   `[CLS] prompt caption [SEP] [PAD]...`: [CLS] (id 101) is GIT's bos, and `generate()` starts every
                caption from it (config.bos_token_id), so training starts there too. No image placeholder tokens
                appear in `input_ids`: the image rows are added by the model.
    labels      input_ids with padding, [CLS] and the prompt set to -100; aligned with input_ids (unshifted).
    logits      (batch, image tokens + text tokens, vocab): only the text part predicts; `loss_sum` asks for the
                last `input_ids.shape[1]` rows alone (`logits_to_keep`) and shifts once, exactly as
                `GitForCausalLM.forward` does with `labels` (`logits[:, num_image_tokens:-1]` against `labels[:, 1:]`).
    token_type_ids  the BERT tokenizer returns them and `generate()` refuses them: `tokenize` never passes them on.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import BertTokenizer, GitConfig, GitForCausalLM, GitProcessor
from transformers.models.git.modeling_git import GitSelfAttention, GitVisionAttention

from ..errors import CaptuneError
from .blip import check_loading_info, prompt_length, vocab_path
from .common import caption_loss_sum, caption_sequence_nll, first_line, target_tokens as _target_tokens

NAME = "git"
TITLE = "GIT"
MODEL_CLASS = "GitForCausalLM"
TINY = "tiny-git"
PRESETS = (TINY,)
# No "beam_cache": GIT has no cross-attention whose keys a beam cache could leave in place; its image tokens sit in
# the ordinary self-attention cache, which beam search has to reorder like any other.
SPEED_LEVERS = frozenset({"sdpa", "int8", "grouped"})
TINY_IMAGE_SIZE = 64
# The image encoder's attention Linears (CLIP naming).
VISION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_TARGET_NAMES = "query, key, value, dense"

# A pretrained GIT-base's fine-tuning values: lr 1e-5 as for BLIP-base (GIT's decoder is pretrained too, so no
# from-scratch rates), 40-token captions; decoding with captune's BLIP setting (beam 3) up to 20 new tokens. These are
# captune's choices, not figures reproduced from the GIT paper (see configs/git_base_coco.yaml).
_DEFAULTS = {
    "train.lr": 1e-5,
    "train.batch_size": 16,
    "train.lora_targets": "query,value",
    "data.max_caption_tokens": 40,
    "eval.num_beams": 3,
    "eval.max_new_tokens": 20,
    "eval.min_new_tokens": 1,
}
# The random tiny GIT learns the shapes task at 1e-3, not at a pretrained model's 1e-5 (see README, demo).
_TINY_DEFAULTS = {**_DEFAULTS, "train.lr": 1e-3}


def defaults(name: str) -> dict[str, object]:
    """Config values for fields the user left unset (see captune.models)."""
    return dict(_TINY_DEFAULTS if name == TINY else _DEFAULTS)


def git_tokenizer() -> BertTokenizer:
    """GIT's tokenizer: BERT-uncased as shipped (30,522 tokens, [CLS] 101 is bos, [SEP] 102 eos, [PAD] 0).

    The slow-tokenizer constructor on purpose: `BertTokenizerFast(vocab_file=...)` silently builds a 5-token vocab.
    """
    tokenizer = BertTokenizer(str(vocab_path()), do_lower_case=True, model_max_length=512)
    assert len(tokenizer) == 30522 and tokenizer.cls_token_id == 101, "BERT vocabulary layout changed"
    return tokenizer


def preset_tokenizer(name: str) -> BertTokenizer:
    return git_tokenizer()


def image_processor(size: int):
    """GIT's image processor is CLIP's (resize the short side, centre crop, CLIP mean/std); PIL backend where
    torchvision is absent."""
    try:
        import torchvision  # noqa: F401
        from transformers import CLIPImageProcessor as Processor
    except Exception:  # torchvision missing or unusable next to this torch build
        from transformers import CLIPImageProcessorPil as Processor
    return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def tiny_config() -> GitConfig:
    """A small GIT: 4-layer 64x64-px ViT (65 image tokens) and a 2-layer text decoder, the real BERT vocabulary.
    (With a 2-layer ViT the 10-epoch demo reached held-out exact match 0.71, most misses naming the wrong shape.)"""
    vision = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  image_size=TINY_IMAGE_SIZE, patch_size=8, initializer_range=0.02)
    return GitConfig(vision_config=vision, vocab_size=30522, hidden_size=128, intermediate_size=256,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, initializer_range=0.02,
                     bos_token_id=101, eos_token_id=102, pad_token_id=0)


def tiny(seed: int = 0) -> tuple[GitForCausalLM, GitProcessor]:
    """The `tiny-git` preset: random weights seeded by `seed`, the shipped BERT tokenizer; fully offline."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GitForCausalLM(tiny_config())
    return model, GitProcessor(image_processor=image_processor(TINY_IMAGE_SIZE), tokenizer=git_tokenizer())


def load(name: str, *, seed: int = 0) -> tuple[GitForCausalLM, GitProcessor]:
    """The `tiny-git` preset, a save_pretrained directory or a hub id (its model_type already checked to be git).

    Raises:
        CaptuneError: the checkpoint lacks weights the model needs or holds ones it does not know (named), or it
            cannot be read.
    """
    if name == TINY:
        return tiny(seed)
    local = Path(name).expanduser().is_dir()
    try:
        model, info = GitForCausalLM.from_pretrained(name, local_files_only=local, output_loading_info=True)
        processor = GitProcessor.from_pretrained(name, local_files_only=local)
    except OSError as exc:
        raise CaptuneError(f"cannot load model '{name}': {first_line(exc)}") from exc
    check_loading_info(name, info)
    return model, processor


def image_size(processor) -> int:
    return processor.image_processor.crop_size["height"]


def pixel_values(processor, images: list) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def tokenize(processor, captions: list[str], *, prompt: str, max_tokens: int) -> dict[str, torch.Tensor]:
    """`[CLS] prompt caption [SEP]` rows; labels -100 at padding, [CLS] and the prompt (see the module docstring).

    The tokenizer's `token_type_ids` are dropped: GIT's forward ignores them and `generate()` refuses them.
    """
    tokenizer = processor.tokenizer
    prompt_tokens = prompt_length(tokenizer, prompt)
    if prompt_tokens >= max_tokens:
        raise ValueError(f"prompt {prompt!r} fills all {max_tokens} caption tokens: raise max_caption_tokens")
    text = [f"{prompt.strip()} {caption}" if prompt.strip() else caption for caption in captions]
    encoded = tokenizer(text, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt",
                        return_token_type_ids=False)
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :prompt_tokens] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def caption_lengths(tokenizer, captions: list[str], prompt: str) -> list[int]:
    """Positions each caption's training row takes before truncation: [CLS], the prompt, the caption, [SEP]."""
    text = [f"{prompt.strip()} {caption}" if prompt.strip() else caption for caption in captions]
    return [len(ids) for ids in tokenizer(text)["input_ids"]]


def start_token_id(processor) -> int:
    """[CLS]: GIT's generate() starts every caption from config.bos_token_id (101, the tokenizer's [CLS])."""
    return processor.tokenizer.cls_token_id


def target_tokens(batch: dict) -> torch.Tensor:
    """Label positions the loss sums over: every non -100 label after the first position."""
    return _target_tokens(batch["labels"])


def loss_sum(model, batch: dict, *, label_smoothing: float) -> torch.Tensor:
    """Summed next-token cross entropy over the text positions (the image rows GIT prepends are never projected
    onto the vocabulary, see `_text_logits`); text logits at t predict label t + 1."""
    return caption_loss_sum(_text_logits(model, batch), batch["labels"], label_smoothing)


def sequence_nll(model, batch: dict) -> torch.Tensor:
    """-log p per row over `loss_sum`'s positions (text rows only, see `_text_logits`)."""
    return caption_sequence_nll(_text_logits(model, batch), batch["labels"])


def _text_logits(model, batch: dict) -> torch.Tensor:
    """(rows, text positions, vocab): the logits of the text positions only. `logits_to_keep` projects just the last
    input_ids-length rows onto the vocabulary: the image rows' logits would be cut off anyway, and with BERT's 30,522
    tokens they cost most of a tiny GIT's step (65 image rows against ~6 text rows: 0.55 -> 0.16 CPU-s a batch of
    16)."""
    input_ids = batch["input_ids"]
    logits = model(pixel_values=batch["pixel_values"], input_ids=input_ids, attention_mask=batch["attention_mask"],
                   logits_to_keep=input_ids.shape[1]).logits
    return logits[:, logits.shape[1] - input_ids.shape[1]:]  # already text-only; kept for a model that ignores it


@torch.inference_mode()
def generate(model, processor, pixel_values: torch.Tensor, options) -> list[str]:
    """Caption a batch of preprocessed images; the prompt is removed, special tokens skipped.

    Only `pixel_values` (and the prompt's `input_ids`) reach `generate()`: never the tokenizer's token_type_ids.
    """
    tokenizer = processor.tokenizer
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    batch = pixel_values.shape[0]
    if options.prompt:
        # [CLS] + the prompt's tokens, without the trailing [SEP] that would end the caption before it starts.
        ids = tokenizer([options.prompt.strip()] * batch, return_tensors="pt")["input_ids"][:, :-1]
        ids = ids.to(parameter.device)
    else:
        ids = None  # generate() starts from bos [CLS] alone
    prompt_positions = ids.shape[1] if ids is not None else 1
    output = model.generate(pixel_values=pixel_values, input_ids=ids, **options.generate_kwargs())
    return [text.strip() for text in tokenizer.batch_decode(output[:, prompt_positions:], skip_special_tokens=True)]


def set_trainable(model, mode: str) -> None:
    """`full`: everything trains; `frozen-vision`: all but the CLIP image encoder (the projection still trains)."""
    if mode == "full":
        model.requires_grad_(True)
    elif mode == "frozen-vision":
        model.requires_grad_(True)
        model.git.image_encoder.requires_grad_(False)
    else:
        raise CaptuneError(f"unknown train.mode {mode!r} for GIT: use full, frozen-vision or lora")


def lora_pattern(targets: list[str], vision: bool) -> str:
    """The text decoder's self-attention Linears named in `targets` (query, key, value, dense); with `vision`, the
    image encoder's attention too (q_proj, k_proj, v_proj, out_proj)."""
    names = "|".join(re.escape(t) for t in targets)
    pattern = rf"git\.encoder\.layer\.\d+\.attention\.(self|output)\.({names})"
    if vision:
        pattern += rf"|git\.image_encoder\.vision_model\.encoder\.layers\.\d+\.self_attn\.({'|'.join(VISION_TARGETS)})"
    return pattern


def vision_tower(model) -> torch.nn.Module:
    """The CLIP image encoder: grouped caption sampling repeats its output rows per caption (GIT's forward then
    sees as many image rows as captions)."""
    return model.git.image_encoder


def int8_targets(model) -> dict[str, torch.nn.Module]:
    """The image encoder and the decoder's transformer layers; the LM head (`output`) stays fp32, as for BLIP: its
    logits pick the next word directly."""
    return {"git.image_encoder": model.git.image_encoder, "git.encoder": model.git.encoder}


def usage_snippet(prompt: str, generation: dict) -> str:
    """The model card's runnable plain-transformers Python block; MODEL is this directory or the Hub repo."""
    kwargs = "".join(f", {k}={v}" for k, v in generation.items())
    if prompt:
        text = (f'input_ids = processor.tokenizer({prompt!r}, return_tensors="pt").input_ids[:, :-1]  '
                "# [CLS] + prompt, no [SEP]\n")
        call, start = "pixel_values=pixel_values, input_ids=input_ids", "input_ids.shape[1]"
    else:
        text, call, start = "", "pixel_values=pixel_values", "1"
    return f"""```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

MODEL = "path/to/this/directory"  # or the Hub repo id you uploaded it to
processor = AutoProcessor.from_pretrained(MODEL)
model = AutoModelForImageTextToText.from_pretrained(MODEL).eval()

image = Image.open("photo.jpg").convert("RGB")
pixel_values = processor(images=image, return_tensors="pt").pixel_values  # no token_type_ids: generate() refuses them
{text}output = model.generate({call}{kwargs})
caption = processor.decode(output[0][{start}:], skip_special_tokens=True)  # without [CLS]{" and the prompt" if prompt else ""}
print(caption)
```"""


def _text_sdpa_forward(self: GitSelfAttention, hidden_states: torch.Tensor, attention_mask=None, cache=None,
                       **kwargs):
    """GitSelfAttention.forward (decoder self-attention over image + text tokens) with a fused attention kernel.

    The additive 4-D mask GitModel builds (bidirectional over image tokens, causal over text, padding) goes to SDPA
    as `attn_mask`; the cache bookkeeping is transformers' own.
    """
    if cache is None and "past_key_values" in kwargs:  # the deprecated name, still accepted upstream until 5.40
        cache = kwargs.pop("past_key_values")
    hidden_shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
    query = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
    value = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.to(query.dtype)
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             dropout_p=self.dropout.p if self.training else 0.0)
    context = context.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size)
    return context, None


def _vision_sdpa_forward(self: GitVisionAttention, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
    """GitVisionAttention.forward (CLIP ViT self-attention) with a fused attention kernel."""
    hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=self.scale,
                                             dropout_p=self.dropout if self.training else 0.0)
    context = context.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
    return self.out_proj(context), None


def sdpa_forward(module: torch.nn.Module):
    """The SDPA forward for a GIT attention module (text decoder self-attention, image encoder attention), else
    None. transformers 5.24 runs GIT's decoder attention eagerly only (attn_implementation="sdpa" is refused)."""
    if isinstance(module, GitSelfAttention):
        return _text_sdpa_forward
    if isinstance(module, GitVisionAttention):
        return _vision_sdpa_forward
    return None
