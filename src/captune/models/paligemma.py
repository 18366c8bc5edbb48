"""PaliGemma (`PaliGemmaForConditionalGeneration`): the family contract of `captune.models` for PaliGemma (3B).

PaliGemma 2 checkpoints (the same class and model_type, Gemma-2 inside) take the same path; only PaliGemma 1 is
tested here (its tiny preset).

PaliGemma is one Gemma decoder over `[image tokens] <bos> prefix \\n suffix <eos>`: a SigLIP ViT encodes the image, a
linear projection maps each patch into Gemma's width, and the model writes those rows over the `<image>` placeholder
tokens (one per patch: `config.text_config.num_image_tokens`). The image and the prefix attend to each other
bidirectionally ("prefix-LM", told apart by `token_type_ids` 0), the suffix causally. A training row, exactly as
`PaliGemmaProcessor(images, text=prefix, suffix=caption)` builds it (a test checks they agree):

    input_ids       `<image> x N, <bos>, prefix, "\\n", caption, <eos>, <pad>...` (right-padded for training, so the
                    1-based positions the model counts from the row's start are those generate() uses).
    token_type_ids  0 on the placeholders, <bos>, the prefix and "\\n" (the bidirectional block), 1 on the caption
                    and <eos>, 0 on padding (masked by attention_mask). The forward needs them for the prefix-LM mask,
                    and `generate()` takes them (the prompt's are all 0), so they are part of the batch.
    labels          input_ids with everything but the caption and <eos> set to -100: the processor's own `suffix=`
                    labels (token_type_ids 0 -> -100); aligned with input_ids, the loss shifts by one.

captune builds the row itself rather than calling the processor: `tokenize` gets captions without images (the
processor refuses text alone), and it truncates the caption (keeping <eos>) to `data.max_caption_tokens` text
positions, which the processor's tokenizer-level truncation would do by cutting <eos> or the prefix.

The prefix is `data.prompt`, the task PaliGemma was pretrained with ("caption en" by default; "caption es", ...);
it is never decoded: captions are the tokens generate() writes after "\\n". The trap this module guards: a SigLIP
image processor saved without `image_seq_length` (the default is None) builds a PaliGemmaProcessor that fails only
when first called; `load` sets it from the model's vision config, `check_processor` refuses a wrong one.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from ..errors import CaptuneError
from .blip import check_loading_info
from .common import IGNORE_INDEX, caption_loss_sum, caption_sequence_nll, first_line, native_sdpa_forward
from .common import target_tokens as _target_tokens

NAME = "paligemma"
TITLE = "PaliGemma"
MODEL_CLASS = "PaliGemmaForConditionalGeneration"
TINY = "tiny-paligemma"
PRESETS = (TINY,)
# "sdpa": transformers' own SDPA path for Gemma and SigLIP attention, switched per call (see `sdpa_forward`).
# No "beam_cache": no cross-attention; the image rows sit in the self-attention cache, which beam search reorders.
SPEED_LEVERS = frozenset({"sdpa", "int8", "grouped"})
DEFAULT_PREFIX = "caption en"
IMAGE_TOKEN = "<image>"
TINY_IMAGE_SIZE = 64
TINY_PATCH = 8
LORA_TARGET_NAMES = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
VISION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

# big_vision's PaliGemma COCO-captions transfer (configs/proj/paligemma/transfers/cococap.py, its `sweep_best`): lr
# 1e-5, 32 text tokens for "caption en" + caption (its text_len), beam 2 decoding up to 32 tokens. Its batch of 256
# is a recipe's grad_accum matter; min 1 new token forbids an empty caption.
_DEFAULTS = {
    "train.lr": 1e-5,
    "train.batch_size": 16,
    "train.lora_targets": "q_proj,k_proj,v_proj,o_proj",
    "data.max_caption_tokens": 32,
    "eval.num_beams": 2,
    "eval.max_new_tokens": 32,
    "eval.min_new_tokens": 1,
}
# The random tiny preset learns the shapes task at 1e-3 (see README: measured with `captune demo`); 2-3 word captions.
_TINY_DEFAULTS = {**_DEFAULTS, "train.lr": 1e-3, "eval.num_beams": 1, "eval.max_new_tokens": 12}


def defaults(name: str) -> dict[str, object]:
    """Config values for fields the user left unset (see captune.models)."""
    return dict(_TINY_DEFAULTS if name == TINY else _DEFAULTS)


def prefix_of(prompt: str) -> str:
    """The prefix a `data.prompt` stands for: empty means "caption en"."""
    return prompt.strip() or DEFAULT_PREFIX


# --- tiny preset ------------------------------------------------------------------------------------------------

def tiny_tokenizer():
    """A Gemma-layout byte-level BPE: <pad> <bos> <eos> <unk> <image> specials, no special tokens added on encoding
    (PaliGemmaProcessor writes <bos> and <eos> itself), and a pair template giving the second text token_type_id 1,
    which is how the processor marks the suffix.

    `extra_special_tokens={"image_token": ...}` so save_pretrained keeps `tokenizer.image_token`, which
    PaliGemmaProcessor reads (without it, it would add another <image>).
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from .tiny_tokenizers import bpe_tokenizer

    base = bpe_tokenizer(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", extra_special=(IMAGE_TOKEN,),
                         add_bos=False).backend_tokenizer
    base.post_processor = processors.TemplateProcessing(single="$A", pair="$A:0 $B:1", special_tokens=[])
    return PreTrainedTokenizerFast(tokenizer_object=base, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": IMAGE_TOKEN},
                                   padding_side="left", model_max_length=512)


def image_processor(size: int, seq_length: int | None):
    """SigLIP's image processor (resize straight to size x size, mean/std 0.5), with the PaliGemma setting
    `image_seq_length`; the PIL backend where torchvision is absent."""
    try:
        import torchvision  # noqa: F401
        from transformers import SiglipImageProcessor as Processor
    except Exception:  # torchvision missing or unusable next to this torch build
        from transformers import SiglipImageProcessorPil as Processor
    return Processor(size={"height": size, "width": size}, image_seq_length=seq_length)


def tiny_processor() -> PaliGemmaProcessor:
    """The preset's processor; PaliGemmaProcessor adds its 1,152 <locXXXX>/<segXXX> tokens to the tokenizer."""
    seq_length = (TINY_IMAGE_SIZE // TINY_PATCH) ** 2
    return PaliGemmaProcessor(image_processor=image_processor(TINY_IMAGE_SIZE, seq_length), tokenizer=tiny_tokenizer())


def preset_tokenizer(name: str):
    return tiny_processor().tokenizer


def tiny_config(tokenizer) -> PaliGemmaConfig:
    """A small PaliGemma: a 2-layer SigLIP on 64-px images (8-px patches: 64 image tokens) and a 2-layer Gemma with
    one key/value head (as Gemma-2B), 128 wide; the vocabulary is the tokenizer's after the processor's additions."""
    width = 128
    vision = dict(hidden_size=width, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH, vision_use_head=False)
    text = GemmaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    return PaliGemmaConfig(vision_config=vision, text_config=text.to_dict(),
                           image_token_index=tokenizer.image_token_id, vocab_size=len(tokenizer),
                           projection_dim=width, hidden_size=width, pad_token_id=tokenizer.pad_token_id)


def full_size_config() -> PaliGemmaConfig:
    """The architecture of google/paligemma-3b-pt-224 (SigLIP-So400m 224 px + Gemma-2B: 2.910 B parameters, the LM
    head tied), for random-weight benchmarks and memory arithmetic; nothing is downloaded."""
    return PaliGemmaConfig(image_token_index=257152)


def tiny(seed: int = 0) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """The `tiny-paligemma` preset: random weights seeded by `seed`, an offline BPE tokenizer."""
    processor = tiny_processor()
    config = tiny_config(processor.tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PaliGemmaForConditionalGeneration(config)
    _eager(model)
    return model, processor


# --- loading ----------------------------------------------------------------------------------------------------

def load(name: str, *, seed: int = 0) -> tuple[PaliGemmaForConditionalGeneration, PaliGemmaProcessor]:
    """The preset, a save_pretrained directory or a hub id (its model_type already checked to be paligemma).

    Raises:
        CaptuneError: missing/unexpected weights (named), no PaliGemma processor, or a processor whose image token
            or image_seq_length disagrees with the model.
    """
    if name == TINY:
        return tiny(seed)
    local = Path(name).expanduser().is_dir()
    from transformers import AutoProcessor

    try:
        model, info = PaliGemmaForConditionalGeneration.from_pretrained(name, local_files_only=local,
                                                                        output_loading_info=True)
        processor = AutoProcessor.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise CaptuneError(f"cannot load PaliGemma model '{name}': {first_line(exc)}") from exc
    check_loading_info(name, info)
    if not isinstance(processor, PaliGemmaProcessor):
        raise CaptuneError(f"'{name}' does not carry a PaliGemmaProcessor (found {type(processor).__name__})")
    _eager(model)
    check_processor(name, model, processor)
    return model, processor


def _eager(model) -> None:
    """transformers picks SDPA for PaliGemma by itself; the contract hands models back eager (captune.speed's
    `sdpa` switch, on by default, decides)."""
    model.set_attn_implementation("eager")


def image_tokens(model) -> int:
    """Image rows the vision tower gives: (image_size / patch_size)^2 (256 at 224 px, 1,024 at 448 px)."""
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def check_processor(name: str, model, processor) -> None:
    """PaliGemma's two processor settings that fail late: image_seq_length and the image token.

    An image processor saved without `image_seq_length` gives None, and PaliGemmaProcessor only fails when first
    called (`'<image>' * None`): it is set here from the model's vision config. A different number is refused, as
    is an image token the model does not replace.

    Raises:
        CaptuneError: a wrong image_seq_length or image token id.
    """
    expected = image_tokens(model)
    if processor.image_seq_length is None:
        processor.image_seq_length = processor.image_processor.image_seq_length = expected
    if processor.image_seq_length != expected:
        raise CaptuneError(f"'{name}': image_seq_length is {processor.image_seq_length} but the vision tower gives "
                           f"{expected} rows for {image_size(processor)}-px images: set \"image_seq_length\": "
                           f"{expected} in its preprocessor_config.json (or processor_config.json)")
    if processor.image_token_id != model.config.image_token_id:
        raise CaptuneError(f"'{name}': the tokenizer's image token {processor.image_token!r} has id "
                           f"{processor.image_token_id}, the model expects {model.config.image_token_id}")


def image_size(processor) -> int:
    return processor.image_processor.size["height"]


def pixel_values(processor, images: list) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


# --- training batches ---------------------------------------------------------------------------------------------

def _seq_length(processor) -> int:
    if not processor.image_seq_length:
        raise CaptuneError("this PaliGemmaProcessor has image_seq_length None: it would fail when called; set it to "
                           "the model's (image_size / patch_size)^2 (captune's loader does)")
    return processor.image_seq_length


def prefix_ids(tokenizer, prompt: str) -> list[int]:
    """`<bos> prefix \\n` as PaliGemmaProcessor writes it after the image placeholders."""
    return tokenizer(tokenizer.bos_token + prefix_of(prompt) + "\n", add_special_tokens=False)["input_ids"]


def suffix_ids(tokenizer, captions: list[str]) -> list[list[int]]:
    """`caption <eos>` per caption, tokenized apart from the prefix as the processor's text pair is."""
    return tokenizer([c + tokenizer.eos_token for c in captions], add_special_tokens=False)["input_ids"]


def tokenize(processor, captions: list[str], *, prompt: str, max_tokens: int) -> dict[str, torch.Tensor]:
    """Image placeholders, `<bos> prefix \\n caption <eos>`, right padding (see the module docstring). `max_tokens`
    counts text positions (the placeholders come on top); a longer caption is cut before its <eos>."""
    tokenizer = processor.tokenizer
    images = _seq_length(processor)
    prefix = prefix_ids(tokenizer, prompt)
    room = max_tokens - len(prefix)
    if room < 2:
        raise ValueError(f"prompt {prefix_of(prompt)!r} fills {len(prefix)} of {max_tokens} caption tokens: raise "
                         "max_caption_tokens")
    suffixes = [s if len(s) <= room else s[:room - 1] + s[-1:] for s in suffix_ids(tokenizer, captions)]
    width = images + len(prefix) + max(len(s) for s in suffixes)
    input_ids = torch.full((len(captions), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    token_type_ids = torch.zeros_like(input_ids)
    head = [processor.image_token_id] * images + prefix
    for row, suffix in enumerate(suffixes):
        end = len(head) + len(suffix)
        input_ids[row, :end] = torch.tensor(head + suffix)
        attention_mask[row, :end] = 1
        token_type_ids[row, len(head):end] = 1
    labels = input_ids.masked_fill(token_type_ids == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
            "labels": labels}


def caption_lengths(tokenizer, captions: list[str], prompt: str) -> list[int]:
    """Text positions each caption's row takes before truncation: <bos>, the prefix, "\\n", the caption, <eos>
    (the image placeholders come on top)."""
    prefix = len(prefix_ids(tokenizer, prompt))
    return [prefix + len(ids) for ids in suffix_ids(tokenizer, list(captions))]


def start_token_id(processor) -> int:
    """<bos>: the first text token of every row, after the image placeholders, in training and in generate()."""
    return processor.tokenizer.bos_token_id


def target_tokens(batch: dict) -> torch.Tensor:
    return _target_tokens(batch["labels"])


def _text_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of the text positions only: the model is asked for the last `width - image tokens` rows
    (`logits_to_keep`), since no image placeholder is ever a target. With Gemma's 257,152-token vocabulary that is
    most of a step's activation memory: 8 rows x 290 positions of fp32 logits are 2.4 GB at 224 px, their text
    positions 0.3 GB. The placeholders lead every row, so the count comes from the config, without a device sync."""
    config = getattr(model, "module", model).config  # DDP; peft forwards attribute reads itself
    images = config.text_config.num_image_tokens
    keep = batch["input_ids"].shape[1] - images
    logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                   logits_to_keep=keep).logits
    return logits, batch["labels"][:, images:]


def loss_sum(model, batch: dict, *, label_smoothing: float) -> torch.Tensor:
    """Summed next-token cross entropy: logits at t predict label t + 1 (everything before the caption -100)."""
    logits, labels = _text_logits(model, batch)
    return caption_loss_sum(logits, labels, label_smoothing)


def sequence_nll(model, batch: dict) -> torch.Tensor:
    """-log p per row over `loss_sum`'s positions (see captune.models)."""
    return caption_sequence_nll(*_text_logits(model, batch))


# --- generation -------------------------------------------------------------------------------------------------

def generation_inputs(processor, batch: int, prompt: str) -> dict[str, torch.Tensor]:
    """The prompt generate() continues: placeholders and `<bos> prefix \\n`, one bidirectional block (types 0).
    Every row has the same prefix, so there is no padding (the tokenizer pads left for batches of mixed prompts)."""
    ids = torch.tensor([processor.image_token_id] * _seq_length(processor) + prefix_ids(processor.tokenizer, prompt))
    ids = ids.expand(batch, -1).clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


@torch.inference_mode()
def generate(model, processor, pixel_values: torch.Tensor, options) -> list[str]:
    """Caption preprocessed images: the returned rows start with the prompt, which is cut off; special tokens are
    skipped and whitespace stripped."""
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    inputs = {k: v.to(parameter.device) for k, v in
              generation_inputs(processor, pixel_values.shape[0], options.prompt).items()}
    output = model.generate(pixel_values=pixel_values, **inputs, **options.generate_kwargs())
    output = output[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.tokenizer.batch_decode(output, skip_special_tokens=True)]


# --- modes and levers ---------------------------------------------------------------------------------------------

def set_trainable(model, mode: str) -> None:
    """`full`: everything trains; `frozen-vision`: all but SigLIP (the projection still trains)."""
    if mode == "full":
        model.requires_grad_(True)
    elif mode == "frozen-vision":
        model.requires_grad_(True)
        model.model.vision_tower.requires_grad_(False)
    else:
        raise CaptuneError(f"unknown train.mode {mode!r} for PaliGemma: use full, frozen-vision or lora")


def lora_pattern(targets: list[str], vision: bool) -> str:
    """Gemma's attention and MLP Linears named in `targets` (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    down_proj); with `vision`, SigLIP's attention too (q_proj, k_proj, v_proj, out_proj)."""
    names = "|".join(re.escape(t) for t in targets)
    pattern = rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({names})"
    if vision:
        pattern += (r"|model\.vision_tower\.encoder\.layers\.\d+\.self_attn\."
                    rf"({'|'.join(VISION_TARGETS)})")
    return pattern


def _inner(model):
    # Under peft, `model.model` is the wrapped PaliGemmaForConditionalGeneration, not its PaliGemmaModel.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vision_tower(model) -> torch.nn.Module:
    """SigLIP: grouped caption sampling repeats its output rows (before the projector) per caption."""
    return _inner(model).model.vision_tower


def int8_targets(model) -> dict[str, torch.nn.Module]:
    """SigLIP and Gemma's layers; the LM head (tied to the embeddings) stays fp32, as for BLIP."""
    return {"model.vision_tower": model.model.vision_tower, "model.language_model": model.model.language_model}


# transformers' Gemma and SigLIP attention read `config._attn_implementation` on every call, so SDPA is theirs: the
# replacement forward runs the module's own forward with it switched to "sdpa" for the call. The masks the eager
# path builds (additive floats, the prefix block bidirectional) are what SDPA takes as `attn_mask`.
_NATIVE_SDPA = ("GemmaAttention", "Gemma2Attention", "SiglipAttention")


def sdpa_forward(module):
    """SDPA for PaliGemma's Gemma and SigLIP attention modules (transformers' own sdpa path); None elsewhere."""
    return native_sdpa_forward(module, _NATIVE_SDPA)


def usage_snippet(prompt: str, generation: dict) -> str:
    """The model card's runnable plain-transformers block: the processor writes the placeholders, <bos> and "\\n"
    around the prefix; the caption is what follows the prompt."""
    kwargs = "".join(f", {k}={v}" for k, v in generation.items())
    return f"""```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

MODEL = "path/to/this/directory"  # or the Hub repo id you uploaded it to
processor = AutoProcessor.from_pretrained(MODEL)
model = AutoModelForImageTextToText.from_pretrained(MODEL).eval()

image = Image.open("photo.jpg").convert("RGB")
inputs = processor(images=image, text="<image>" + {prefix_of(prompt)!r}, return_tensors="pt")
inputs.pop("labels")  # all -100 without a suffix: not a generate() input
output = model.generate(**inputs{kwargs})
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
```"""
