"""BLIP (`BlipForConditionalGeneration`): the family contract of `captune.models` for BLIP captioners.

The caption objective as the original BLIP trains it:
    input_ids   `[DEC] prompt caption [SEP] [PAD]...`: the tokenizer's first token ([CLS]) is replaced by the bos
                token [DEC], because `generate()` starts every caption with [DEC]; training on [CLS] would teach a
                context the decoder never sees at inference.
    labels      input_ids with padding and the prompt (and [DEC]) set to -100. The loss shifts by one, so
                position 0 is never a target. BLIP has no image placeholder tokens: the image enters through the
                text decoder's cross-attention.
    padding     to the longest caption in the batch, never to a fixed 512; captions are truncated to `max_tokens`.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from pathlib import Path

import torch
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

from ..errors import CaptuneError
from .blip_sdpa import beam_search_cache, sdpa_forward  # noqa: F401  (sdpa_forward is part of the contract)
from .common import IGNORE_INDEX, caption_loss_sum, caption_sequence_nll, first_line, target_tokens as _target_tokens

log = logging.getLogger("captune")

NAME = "blip"
TITLE = "BLIP"
MODEL_CLASS = "BlipForConditionalGeneration"
TINY = "tiny"
PRESETS = (TINY,)
SPEED_LEVERS = frozenset({"sdpa", "beam_cache", "int8", "grouped"})
DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"
TINY_IMAGE_SIZE = 64
# The vision encoder's attention Linears in transformers' BLIP: a fused qkv and the output projection.
VISION_TARGETS = ("qkv", "projection")

# BLIP-base/large as the paper fine-tunes them on COCO (lr 1e-5 at batch 256, 40-token captions; small data often
# wants 2e-5 to 5e-5) and decodes (beam 3, max_length 20 / min_length 5 counting [DEC] and the 3-token prompt "a
# picture of": 1 to 16 new tokens, see tests/test_decoding_lengths.py).
_DEFAULTS = {
    "train.lr": 1e-5,
    "train.batch_size": 16,
    "train.lora_targets": "query,value",
    "data.max_caption_tokens": 40,
    "eval.num_beams": 3,
    "eval.max_new_tokens": 16,
    "eval.min_new_tokens": 1,
}
# The random tiny BLIP learns nothing at a pretrained model's 1e-5: it needs 1e-3 (the demo's shapes task).
_TINY_DEFAULTS = {**_DEFAULTS, "train.lr": 1e-3}


def defaults(name: str) -> dict[str, object]:
    """Config values for fields the user left unset (see captune.models)."""
    return dict(_TINY_DEFAULTS if name == TINY else _DEFAULTS)


def vocab_path() -> Path:
    """The BERT-uncased WordPiece vocabulary (30,522 tokens) that BLIP's tokenizer is built on."""
    return Path(str(resources.files("captune") / "assets" / "bert-base-uncased-vocab.txt"))


def blip_tokenizer() -> BertTokenizer:
    """BLIP's tokenizer layout: BERT-uncased plus bos `[DEC]` (id 30522) and `[ENC]` (id 30523).

    Built with the slow-tokenizer constructor on purpose: `BertTokenizerFast(vocab_file=...)` silently builds a
    5-token vocabulary.
    """
    tokenizer = BertTokenizer(
        str(vocab_path()),
        do_lower_case=True,
        bos_token="[DEC]",
        additional_special_tokens=["[ENC]"],
        model_max_length=512,
    )
    assert len(tokenizer) == 30524 and tokenizer.bos_token_id == 30522, "BLIP vocabulary layout changed"
    return tokenizer


def preset_tokenizer(name: str) -> BertTokenizer:
    return blip_tokenizer()


def image_processor(size: int):
    """BLIP's image processor (bicubic resize, CLIP mean/std); the PIL backend where torchvision is absent."""
    try:
        import torchvision  # noqa: F401
        from transformers import BlipImageProcessor as Processor
    except Exception:  # torchvision missing or unusable next to this torch build
        from transformers import BlipImageProcessorPil as Processor
    return Processor(size={"height": size, "width": size})


def tiny_config() -> BlipConfig:
    """A small BLIP: 4-layer 64x64-px ViT and a 2-layer text decoder, real BLIP vocabulary and special ids."""
    vision = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        # BlipVisionConfig defaults to 1e-10, which leaves the ViT nearly constant; the real checkpoint uses 0.02.
        initializer_range=0.02,
    )
    text = dict(
        vocab_size=30524,
        hidden_size=128,
        encoder_hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=30522,
        pad_token_id=0,
        sep_token_id=102,
        eos_token_id=2,
        initializer_range=0.02,
    )
    return BlipConfig(vision_config=vision, text_config=text, projection_dim=128, initializer_range=0.02)


def tiny(seed: int = 0) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """The `tiny` preset: random weights seeded by `seed`, the shipped BLIP tokenizer; fully offline."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(tiny_config())
    return model, BlipProcessor(image_processor=image_processor(TINY_IMAGE_SIZE), tokenizer=blip_tokenizer())


def load(name: str, *, seed: int = 0) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """The `tiny` preset, a save_pretrained directory or a hub id (its model_type already checked to be blip).

    Raises:
        CaptuneError: the checkpoint lacks weights the model needs or holds ones it does not know (named), or it
            cannot be read.
    """
    if name == TINY:
        return tiny(seed)
    local = Path(name).expanduser().is_dir()
    try:
        model, info = BlipForConditionalGeneration.from_pretrained(name, local_files_only=local,
                                                                   output_loading_info=True)
        processor = BlipProcessor.from_pretrained(name, local_files_only=local)
    except OSError as exc:
        raise CaptuneError(f"cannot load model '{name}': {first_line(exc)}") from exc
    check_loading_info(name, info)
    if not isinstance(processor, BlipProcessor):
        raise CaptuneError(f"'{name}' does not carry a BLIP processor; captune fine-tunes BlipForConditionalGeneration")
    return model, processor


def check_loading_info(name: str, info: dict) -> None:
    """Refuse a checkpoint whose weights do not cover the model (a silent random init) or that holds strangers.

    Raises:
        CaptuneError: naming the first missing / unexpected / mismatched weights.
    """
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "wrongly shaped")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in (info.get(key) or []))
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{len(names)} {what} ({shown})")
    if problems:
        raise CaptuneError(f"checkpoint '{name}' does not match its model class: weights {'; '.join(problems)}; "
                           "it would train from partly random weights. Re-save it with save_pretrained from the "
                           "class it was trained as")


def image_size(processor) -> int:
    return processor.image_processor.size["height"]


def pixel_values(processor, images: list) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def prompt_length(tokenizer, prompt: str) -> int:
    """Number of leading positions the prompt occupies: bos plus the prompt's tokens (no [SEP])."""
    if not prompt:
        return 1
    return len(tokenizer(prompt, add_special_tokens=True)["input_ids"]) - 1


def tokenize(processor, captions: list[str], *, prompt: str, max_tokens: int) -> dict[str, torch.Tensor]:
    """`[DEC] prompt caption [SEP]` rows; labels -100 at padding, [DEC] and the prompt (see the module docstring)."""
    tokenizer = processor.tokenizer
    prompt_tokens = prompt_length(tokenizer, prompt)
    if prompt_tokens >= max_tokens:
        raise ValueError(f"prompt {prompt!r} fills all {max_tokens} caption tokens: raise max_caption_tokens")
    # Joined with one space whatever the prompt's trailing whitespace (YAML and shells strip it).
    text = [f"{prompt.strip()} {caption}" if prompt.strip() else caption for caption in captions]
    encoded = tokenizer(text, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
    input_ids = encoded["input_ids"]
    input_ids[:, 0] = tokenizer.bos_token_id
    labels = input_ids.masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
    labels[:, :prompt_tokens] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": encoded["attention_mask"], "labels": labels}


def caption_lengths(tokenizer, captions: list[str], prompt: str) -> list[int]:
    """Positions each caption's training row takes before truncation: [CLS]/[DEC], the prompt, the caption, [SEP]."""
    text = [f"{prompt.strip()} {caption}" if prompt.strip() else caption for caption in captions]
    return [len(ids) for ids in tokenizer(text)["input_ids"]]


def start_token_id(processor) -> int:
    """bos [DEC]: BLIP's generate() starts every caption from it (text_config.bos_token_id)."""
    return processor.tokenizer.bos_token_id


def target_tokens(batch: dict) -> torch.Tensor:
    """Label positions the loss sums over: every non -100 label after the first position."""
    return _target_tokens(batch["labels"])


def loss_sum(model, batch: dict, *, label_smoothing: float) -> torch.Tensor:
    """Summed next-token cross entropy; the decoder's logits at t predict label t + 1."""
    outputs = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"])
    return caption_loss_sum(outputs.logits, batch["labels"], label_smoothing)


def sequence_nll(model, batch: dict) -> torch.Tensor:
    """-log p per row over `loss_sum`'s positions (see captune.models)."""
    outputs = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"])
    return caption_sequence_nll(outputs.logits, batch["labels"])


@torch.inference_mode()
def generate(model, processor, pixel_values: torch.Tensor, options) -> list[str]:
    """Caption a batch of preprocessed images; the prompt is removed, special tokens skipped."""
    tokenizer = processor.tokenizer
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    batch = pixel_values.shape[0]
    if options.prompt:
        # generate() swaps the leading [CLS] for bos [DEC] and drops the trailing [SEP], as in training.
        ids = tokenizer([options.prompt] * batch, return_tensors="pt")["input_ids"].to(parameter.device)
        prompt_positions = ids.shape[1] - 1
    else:
        ids, prompt_positions = None, 1  # generate() starts from [DEC] alone
    kwargs = options.generate_kwargs()
    if options.num_beams > 1:
        kwargs["cache"] = beam_search_cache()  # same captions, without copying image keys every step
    output = model.generate(pixel_values=pixel_values, input_ids=ids, **kwargs)
    return [text.strip() for text in tokenizer.batch_decode(output[:, prompt_positions:], skip_special_tokens=True)]


def set_trainable(model, mode: str) -> None:
    """`full`: everything trains; `frozen-vision`: all but the ViT."""
    if mode == "full":
        model.requires_grad_(True)
    elif mode == "frozen-vision":
        model.requires_grad_(True)
        model.vision_model.requires_grad_(False)
    else:
        raise CaptuneError(f"unknown train.mode {mode!r} for BLIP: use full, frozen-vision or lora")


def lora_pattern(targets: list[str], vision: bool) -> str:
    """The text decoder's self- and cross-attention Linears named in `targets` (query, key, value, dense); with
    `vision`, the ViT's self-attention too (qkv, projection)."""
    names = "|".join(re.escape(t) for t in targets)
    pattern = rf"text_decoder\.bert\.encoder\.layer\.\d+\.(attention|crossattention)\.(self|output)\.({names})"
    if vision:
        pattern += rf"|vision_model\.encoder\.layers\.\d+\.self_attn\.({'|'.join(VISION_TARGETS)})"
    return pattern


LORA_TARGET_NAMES = "query, key, value, dense"


def vision_tower(model) -> torch.nn.Module:
    """The ViT: grouped caption sampling repeats its output rows per caption."""
    return model.vision_model


def int8_targets(model) -> dict[str, torch.nn.Module]:
    """The vision transformer and the text decoder's transformer layers.

    The LM head (`text_decoder.cls`, whose output layer shares its weight with the word embeddings) stays fp32: its
    logits pick the next word directly, so its rounding flips choices most. Quantizing it as well was about 10% faster
    in one greedy trial on full-size BLIP-base (8 images: 4.0 s vs 4.5 s; fp32 9.9 s) but left fewer beam-3 captions
    identical to fp32 on a briefly trained tiny model (95% vs 98%); see benchmarks/RESULTS.md.
    """
    return {"vision_model": model.vision_model, "text_decoder.bert": model.text_decoder.bert}


def usage_snippet(prompt: str, generation: dict) -> str:
    """The model card's runnable plain-transformers Python block; MODEL is this directory or the Hub repo it is uploaded to."""
    kwargs = ", ".join(f"{k}={v}" for k, v in generation.items())
    text = f", text={prompt!r}" if prompt else ""
    # generate() returns [DEC] + the prompt's tokens + the caption; the prompt is [CLS] + tokens + [SEP] long.
    start = '[inputs["input_ids"].shape[1] - 1:]' if prompt else ""
    return f"""```python
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

MODEL = "path/to/this/directory"  # or the Hub repo id you uploaded it to
processor = BlipProcessor.from_pretrained(MODEL)
model = BlipForConditionalGeneration.from_pretrained(MODEL).eval()

image = Image.open("photo.jpg").convert("RGB")
inputs = processor(images=image{text}, return_tensors="pt")
output = model.generate(**inputs{', ' + kwargs if kwargs else ''})
caption = processor.decode(output[0]{start}, skip_special_tokens=True){"  # without the prompt" if prompt else ""}
print(caption)
```"""
