"""Florence-2 (`Florence2ForConditionalGeneration`): the family contract of `captune.models` for Florence-2.

Florence-2 is an encoder-decoder (DaViT vision tower + BART): the task prompt is the encoder's input, the caption
the decoder's target. A training row, exactly as the processor and the model build them:

    input_ids          encoder: `<image> x image_seq_length, <s>, the task's text, </s>`, the same for every row
                       (`<CAPTION>` becomes "What does the image describe?", as Florence2Processor writes it); the
                       image placeholders are replaced by the vision tower's projected features inside the model.
    labels             decoder targets `<s> caption </s>` (BART's layout; generate() writes `</s> <s> caption </s>`),
                       -100 at padding; never shifted here: logits at t predict labels at t, as the model's own loss
                       (`shift_labels=labels`) takes them.
    decoder_input_ids  labels shifted right once with the decoder start token (`</s>`, what generate() starts from)
                       first: what the model itself builds from `labels` (`shift_tokens_right`), so no double shift.

The prompt is `data.prompt`: one of the caption tasks (`<CAPTION>`, `<DETAILED_CAPTION>`, `<MORE_DETAILED_CAPTION>`)
or free text; empty means `<CAPTION>`. Generated text goes through the processor's `post_process_generation`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (BartConfig, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor,
                          PreTrainedTokenizerFast)

from ..errors import CaptuneError
from .blip import check_loading_info
from .common import IGNORE_INDEX, first_line

NAME = "florence2"
TITLE = "Florence-2"
MODEL_CLASS = "Florence2ForConditionalGeneration"
TINY = "tiny-florence2"
PRESETS = (TINY,)
# No "sdpa" lever of captune's own: transformers' Florence-2 runs SDPA natively (attn_implementation="sdpa").
# No "beam_cache": BART's cross-attention cache is computed once and reordered by transformers' beam search.
SPEED_LEVERS = frozenset({"int8", "grouped"})
DEFAULT_TASK = "<CAPTION>"
CAPTION_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
IMAGE_TOKEN = "<image>"
TINY_IMAGE_SIZE = 64
LORA_TARGET_NAMES = "q_proj, k_proj, v_proj, out_proj"
# The DaViT vision tower's attention Linears (window and channel attention alike).
VISION_TARGETS = ("qkv", "proj")

# Florence-2-base/large: <MORE_DETAILED_CAPTION> writes 50-200 words, ~1.3 byte-level BPE tokens a word, so 320
# caption tokens (<s> and </s> included) and 300 new tokens hold them; padding is to the longest caption in a batch,
# so COCO-length captions cost no more for it. Beam 3 as Florence-2's own examples decode. lr 5e-6 is a starting
# point between Hugging Face's Florence-2 fine-tuning blog (1e-6, vision frozen) and BLIP's 1e-5; not tuned here.
# min 2 new tokens: the first is always <s>, so 2 forbids an empty caption.
_DEFAULTS = {
    "train.lr": 5e-6,
    "train.batch_size": 16,
    "train.lora_targets": "q_proj,v_proj",
    "data.max_caption_tokens": 320,
    "eval.num_beams": 3,
    "eval.max_new_tokens": 300,
    "eval.min_new_tokens": 2,
}
# The random tiny preset learns the shapes task at 1e-3 (see README: measured with `captune demo`); short captions,
# so it decodes greedily and briefly.
_TINY_DEFAULTS = {**_DEFAULTS, "train.lr": 1e-3, "eval.num_beams": 1, "eval.max_new_tokens": 20}


def defaults(name: str) -> dict[str, object]:
    """Config values for fields the user left unset (see captune.models)."""
    return dict(_TINY_DEFAULTS if name == TINY else _DEFAULTS)


def task_of(prompt: str) -> str:
    """The encoder prompt a `data.prompt` stands for: empty means `<CAPTION>`."""
    return prompt.strip() or DEFAULT_TASK


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A BART-layout byte-level BPE (`<s> text </s>`), `<image>` registered as the processor's image token.

    `extra_special_tokens={"image_token": ...}` rather than a plain attribute: save_pretrained writes it to
    tokenizer_config.json, so a reloaded tokenizer (and Florence2Processor, which reads `tokenizer.image_token`)
    still has it.
    """
    from .tiny_tokenizers import bpe_tokenizer

    base = bpe_tokenizer(extra_special=(IMAGE_TOKEN,), add_bos=True, add_eos=True)
    return PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   extra_special_tokens={"image_token": IMAGE_TOKEN}, model_max_length=1024)


def preset_tokenizer(name: str) -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def image_processor(size: int, seq_length: int):
    """Florence-2's image processor (CLIP's, resized straight to size x size, ImageNet mean/std, no crop);
    the PIL backend where torchvision is absent."""
    try:
        import torchvision  # noqa: F401
        from transformers import CLIPImageProcessor as Processor
    except Exception:  # torchvision missing or unusable next to this torch build
        from transformers import CLIPImageProcessorPil as Processor
    return Processor(size={"height": size, "width": size}, crop_size={"height": size, "width": size},
                     do_center_crop=False, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                     image_seq_length=seq_length)


def vision_seq_length(config: Florence2Config, image_side: int) -> int:
    """Rows the vision tower + projector give an image_side x image_side image: the last stage's feature map
    (each stage a strided conv) plus one pooled (temporal) row. 577 for the real 768-px checkpoints."""
    vision = config.vision_config
    side = image_side
    for kernel, stride, padding in zip(vision.patch_size, vision.patch_stride, vision.patch_padding):
        side = (side + 2 * padding - kernel) // stride + 1
    return side * side + 1


def tiny_config(tokenizer) -> Florence2Config:
    """A small Florence-2: a 2-stage DaViT (64 px -> 8x8 features) and a 2+2-layer BART, d_model 128.

    d_model 64 with 1+1 layers learnt the shapes task far slower (held-out exact match 0.04 vs 0.62 after 280 steps
    of 16 at lr 1e-3 in one trial), for about half the compute a step."""
    vision = dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                  patch_prenorm=[False, True], embed_dim=[32, 64], num_heads=[2, 4], num_groups=[2, 4],
                  window_size=4, projection_dim=128, drop_path_rate=0.0)
    text = BartConfig(vocab_size=len(tokenizer), d_model=128, encoder_layers=2, decoder_layers=2,
                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
                      max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id)
    return Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)


# Florence2PostProcessor parses only the tasks its config names; captions are "pure_text".
POST_PROCESSOR_CONFIG = {"pure_text": {}}


def tiny(seed: int = 0) -> tuple[Florence2ForConditionalGeneration, Florence2Processor]:
    """The `tiny-florence2` preset: random weights seeded by `seed`, an offline BPE tokenizer."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Florence2ForConditionalGeneration(config)
    processor = Florence2Processor(
        image_processor=image_processor(TINY_IMAGE_SIZE, vision_seq_length(config, TINY_IMAGE_SIZE)),
        tokenizer=tokenizer, post_processor_config=POST_PROCESSOR_CONFIG)
    return model, processor


def load(name: str, *, seed: int = 0) -> tuple[Florence2ForConditionalGeneration, Florence2Processor]:
    """The preset, a save_pretrained directory or a hub id (its model_type already checked to be florence2).

    Raises:
        CaptuneError: missing/unexpected weights (named), no Florence-2 processor, a tokenizer without an image
            token, or an image_seq_length other than the vision tower's output length.
    """
    if name == TINY:
        return tiny(seed)
    local = Path(name).expanduser().is_dir()
    from transformers import AutoProcessor

    try:
        model, info = Florence2ForConditionalGeneration.from_pretrained(name, local_files_only=local,
                                                                        output_loading_info=True)
        processor = AutoProcessor.from_pretrained(name, local_files_only=local)
    except (OSError, AttributeError, ValueError) as exc:
        # A tokenizer saved without extra_special_tokens' image_token fails inside Florence2Processor (AttributeError).
        raise CaptuneError(f"cannot load Florence-2 model '{name}': {first_line(exc)}; its tokenizer_config.json "
                           f"must carry extra_special_tokens {{\"image_token\": \"{IMAGE_TOKEN}\"}}") from exc
    check_loading_info(name, info)
    if not isinstance(processor, Florence2Processor):
        raise CaptuneError(f"'{name}' does not carry a Florence2Processor (found {type(processor).__name__})")
    check_processor(name, model, processor)
    return model, processor


def check_processor(name: str, model, processor) -> None:
    """The two settings Florence-2 checkpoints get wrong: the image token and image_seq_length.

    Raises:
        CaptuneError: the tokenizer's image token is not the model's, the decoder starts from another token than
            </s>, or the processor would write a different
            number of image placeholders than the vision tower gives features (the model fails only at call time).
    """
    if processor.image_token_id != model.config.image_token_id:
        raise CaptuneError(f"'{name}': the tokenizer's image token {processor.image_token!r} has id "
                           f"{processor.image_token_id}, the model expects {model.config.image_token_id}")
    start = model.config.text_config.decoder_start_token_id
    if start != start_token_id(processor):
        raise CaptuneError(f"'{name}': decoder_start_token_id is {start}, not the tokenizer's </s> "
                           f"({start_token_id(processor)}) that captune trains the decoder to start from")
    expected = vision_seq_length(model.config, image_size(processor))
    if processor.num_image_tokens != expected:
        raise CaptuneError(f"'{name}': image_seq_length is {processor.num_image_tokens} but the vision tower gives "
                           f"{expected} rows for {image_size(processor)}-px images: set \"image_seq_length\": "
                           f"{expected} in its preprocessor_config.json")


def image_size(processor) -> int:
    return processor.image_processor.size["height"]


def pixel_values(processor, images: list) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def encoder_ids(processor, prompt: str, rows: int) -> torch.Tensor:
    """The encoder input Florence2Processor builds for `prompt`: image placeholders, <s>, the task's text, </s>."""
    tokenizer = processor.tokenizer
    text = processor._construct_prompts([task_of(prompt)])[0]
    ids = tokenizer(processor.image_token * processor.num_image_tokens + tokenizer.bos_token + text
                    + tokenizer.eos_token, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids.expand(rows, -1).clone()


def tokenize(processor, captions: list[str], *, prompt: str, max_tokens: int) -> dict[str, torch.Tensor]:
    """Encoder prompt rows plus decoder targets `<s> caption </s>` (see the module docstring)."""
    tokenizer = processor.tokenizer
    encoded = tokenizer(captions, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
    input_ids = encoder_ids(processor, prompt, len(captions))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "decoder_input_ids": shift_right(labels, tokenizer.pad_token_id, start_token_id(processor))}


def caption_lengths(tokenizer, captions: list[str], prompt: str) -> list[int]:
    """Decoder positions each caption takes before truncation: `<s> caption </s>` (the prompt is encoder input)."""
    return [len(ids) for ids in tokenizer(captions)["input_ids"]]


def shift_right(labels: torch.Tensor, pad_token_id: int, start: int) -> torch.Tensor:
    """The decoder's inputs: labels one position later, the start token first, -100 as padding (as the model's
    own `shift_tokens_right`)."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, pad_token_id)
    shifted[:, 0] = start
    return shifted


def start_token_id(processor) -> int:
    """BART's decoder start token `</s>` (config.text_config.decoder_start_token_id; `load` checks they agree)."""
    return processor.tokenizer.eos_token_id


def target_tokens(batch: dict) -> torch.Tensor:
    """Every non -100 label: decoder labels are targets at their own position (no shift)."""
    return (batch["labels"] != IGNORE_INDEX).sum()


def loss_sum(model, batch: dict, *, label_smoothing: float) -> torch.Tensor:
    """Summed cross entropy of the decoder's logits at t against labels at t."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"], decoder_input_ids=batch["decoder_input_ids"]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="sum")


def sequence_nll(model, batch: dict) -> torch.Tensor:
    """-log p per row over `loss_sum`'s positions: decoder logits at t against labels at t (no shift)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"], decoder_input_ids=batch["decoder_input_ids"]).logits
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view_as(batch["labels"]).sum(dim=1)


@torch.inference_mode()
def generate(model, processor, pixel_values: torch.Tensor, options) -> list[str]:
    """Caption a batch of preprocessed images: the task prompt as encoder input, the processor's post-processing."""
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    task = task_of(options.prompt)
    ids = encoder_ids(processor, task, pixel_values.shape[0]).to(parameter.device)
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                            **options.generate_kwargs())
    # Special tokens skipped in decoding: a batch's shorter captions end in <pad>, which the pure-text parser keeps.
    texts = processor.batch_decode(output, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    side = image_size(processor)
    return [processor.post_process_generation(text=text, task=task, image_size=(side, side))[task].strip()
            for text in texts]


def set_trainable(model, mode: str) -> None:
    """`full`: everything trains; `frozen-vision`: all but the DaViT tower (its projector still trains)."""
    if mode == "full":
        model.requires_grad_(True)
    elif mode == "frozen-vision":
        model.requires_grad_(True)
        model.model.vision_tower.requires_grad_(False)
    else:
        raise CaptuneError(f"unknown train.mode {mode!r} for Florence-2: use full, frozen-vision or lora")


def lora_pattern(targets: list[str], vision: bool) -> str:
    """BART's encoder and decoder self- and cross-attention Linears named in `targets` (q_proj, k_proj, v_proj,
    out_proj); with `vision`, the DaViT's window and channel attention too (qkv, proj)."""
    names = "|".join(re.escape(t) for t in targets)
    pattern = rf"model\.language_model\.(encoder|decoder)\.layers\.\d+\.(self_attn|encoder_attn)\.({names})"
    if vision:
        pattern += (r"|model\.vision_tower\.blocks\.\d+\.\d+\.(spatial_block\.window_attn|channel_block\.channel_attn)"
                    rf"\.({'|'.join(VISION_TARGETS)})")
    return pattern


def vision_tower(model) -> torch.nn.Module:
    """The DaViT: grouped caption sampling repeats its output rows (before the projector) per caption."""
    # Under peft, `model.model` is the wrapped Florence2ForConditionalGeneration, not its Florence2Model.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.vision_tower


def int8_targets(model) -> dict[str, torch.nn.Module]:
    """The DaViT and BART's encoder/decoder layers; the LM head (tied to the embeddings) stays fp32 as in BLIP."""
    return {"model.vision_tower": model.model.vision_tower, "model.language_model": model.model.language_model}


def sdpa_forward(module):
    return None


def usage_snippet(prompt: str, generation: dict) -> str:
    """The model card's runnable plain-transformers Python block; MODEL is this directory or the Hub repo it is uploaded to."""
    kwargs = ", ".join(f"{k}={v}" for k, v in generation.items())
    task = task_of(prompt)
    return f"""```python
from PIL import Image
from transformers import AutoProcessor, Florence2ForConditionalGeneration

MODEL = "path/to/this/directory"  # or the Hub repo id you uploaded it to
TASK = {task!r}
processor = AutoProcessor.from_pretrained(MODEL)
model = Florence2ForConditionalGeneration.from_pretrained(MODEL).eval()

image = Image.open("photo.jpg").convert("RGB")
inputs = processor(text=TASK, images=image, return_tensors="pt")
output = model.generate(**inputs{', ' + kwargs if kwargs else ''})
text = processor.batch_decode(output, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
caption = processor.post_process_generation(text=text, task=TASK, image_size=image.size)[TASK]
print(caption)
```"""
