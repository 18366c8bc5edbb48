"""BLIP-2 (`Blip2ForConditionalGeneration`): the family contract of `captune.models`, for both language models.

BLIP-2 turns an image into `num_query_tokens` embeddings (ViT -> Q-Former -> a linear projection) that take the
place of as many `<image>` placeholder tokens in the language model's input. Two language-model kinds:

OPT (decoder-only), as LAVIS's blip2_opt trains captions:
    input_ids   `<image> x Q, </s>, prompt, caption, \\n, <pad>...`: `</s>` is OPT's bos and what `generate()` puts
                after the placeholders; the caption ends with "\\n", which is the language model's eos in the released
                checkpoints (text_config.eos_token_id 50118) and what LAVIS appends to every training caption.
    labels      input_ids with placeholders, `</s>`, the prompt and padding set to -100 (the loss shifts by one).
Flan-T5 (encoder-decoder), as LAVIS's blip2_t5:
    input_ids          encoder side: `<image> x Q, prompt, </s>` (the prompt is the encoder's, never decoded).
    decoder_input_ids  `<pad>(= decoder_start_token_id), caption, </s>, <pad>...`: what generate() starts from.
    labels             aligned with decoder_input_ids, -100 at the start token and padding: the same shifted
                       convention as the causal families, so `common.caption_loss_sum` and SCST apply unchanged
                       (T5's own loss takes labels[:, 1:] and builds the same decoder inputs by shifting right).

The trap this module guards: a `Blip2Processor` without `num_query_tokens` inserts no placeholders, the image
embeddings replace nothing, and the model trains on text alone without a word. `load` fills it from the model's
config; `tokenize` refuses a processor without it.

Training modes: `full`, `frozen-vision`, `frozen-lm` (the paper's fine-tuning, the default for released
checkpoints: ViT and Q-Former train, the language model stays frozen) and LoRA on the language model's attention.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

from ..errors import CaptuneError
from .blip import check_loading_info, image_processor
from .common import IGNORE_INDEX, caption_loss_sum, caption_sequence_nll, first_line, native_sdpa_forward
from .common import target_tokens as _target_tokens

log = logging.getLogger("captune")

NAME = "blip2"
TITLE = "BLIP-2"
MODEL_CLASS = "Blip2ForConditionalGeneration"
TINY_OPT = "tiny-blip2"
TINY_T5 = "tiny-blip2-t5"
PRESETS = (TINY_OPT, TINY_T5)
# No beam cross-attention cache: OPT attends to the image through its own input sequence (nothing to share), and
# T5's encoder output is computed once per image by generate() already.
SPEED_LEVERS = frozenset({"sdpa", "int8", "grouped"})
TINY_IMAGE_SIZE = 64
TINY_QUERIES = 16
IMAGE_TOKEN = "<image>"
END_OF_CAPTION = "\n"  # OPT variant: LAVIS's caption end, the released checkpoints' eos (see module docstring)
VISION_TARGETS = ("qkv", "projection")
# OPT's and T5's names for the same attention projections: either spelling adapts either language model.
_LM_ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o"}
LORA_TARGET_NAMES = "q_proj, k_proj, v_proj, out_proj (OPT) or q, k, v, o (T5)"
MODES = ("full", "frozen-vision", "frozen-lm", "lora")

# BLIP-2 OPT-2.7B as LAVIS fine-tunes it on COCO (caption_coco_ft.yaml: lr 1e-5, batch 16 per GPU, captions of 32
# tokens, beam 5 decoding 8 to 30 new tokens after the prompt "a photo of").
_DEFAULTS = {
    "train.mode": "frozen-lm",
    "train.lr": 1e-5,
    "train.batch_size": 16,
    "train.lora_targets": "q_proj,v_proj",
    "data.max_caption_tokens": 32,
    "eval.num_beams": 5,
    "eval.max_new_tokens": 30,
    "eval.min_new_tokens": 8,
}
_T5_DEFAULTS = {**_DEFAULTS, "train.lora_targets": "q,v"}
# The random tiny presets: a random language model cannot stay frozen (it knows no words), so everything trains,
# at the learning rate under which they learn the demo's shapes task; shapes captions are 3-6 words.
_TINY = {"train.mode": "full", "train.lr": 1e-3, "eval.num_beams": 1, "eval.max_new_tokens": 12,
         "eval.min_new_tokens": 1, "data.max_caption_tokens": 24}


def defaults(name: str) -> dict[str, object]:
    """Config values for fields the user left unset (see captune.models); T5 or OPT from `name`'s config."""
    if name == TINY_OPT:
        return {**_DEFAULTS, **_TINY}
    if name == TINY_T5:
        return {**_T5_DEFAULTS, **_TINY}
    return dict(_T5_DEFAULTS if _language_model_type(name) == "t5" else _DEFAULTS)


def _language_model_type(name: str) -> str | None:
    """text_config.model_type of a saved BLIP-2 directory ("opt", "t5"), or a guess from a hub id's name."""
    config = Path(name).expanduser() / "config.json" if name else None
    if config is not None and config.is_file():
        try:
            return json.loads(config.read_text(encoding="utf-8")).get("text_config", {}).get("model_type")
        except (OSError, json.JSONDecodeError, AttributeError):
            return None
    return "t5" if "t5" in name.lower() else "opt"


# --- tiny presets -----------------------------------------------------------------------------------------------

def preset_tokenizer(name: str):
    """The preset's byte-level BPE (tiny_tokenizers): OPT's special-token layout, or T5's (no bos, eos appended)."""
    from .tiny_tokenizers import bpe_tokenizer

    if name == TINY_T5:
        return bpe_tokenizer(bos="</s>", eos="</s>", pad="<pad>", unk="<unk>", extra_special=(IMAGE_TOKEN,),
                             add_bos=False, add_eos=True)
    return bpe_tokenizer(bos="</s>", eos="</s>", pad="<pad>", unk="<unk>", extra_special=(IMAGE_TOKEN,))


def tiny_config(name: str, tokenizer) -> Blip2Config:
    """A small BLIP-2: 4-layer 64-px ViT (tiny BLIP's), 2-layer Q-Former with 16 queries, 2-layer OPT or 2+2-layer
    T5, all 128 wide. (A 2-layer 32-px ViT with 8 queries reached held-out exact match 0.18 in the 3-epoch demo.)"""
    from transformers import OPTConfig, T5Config

    vision = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  image_size=TINY_IMAGE_SIZE, patch_size=8,
                  initializer_range=0.02)  # Blip2VisionConfig's default 1e-10 leaves the ViT nearly constant
    qformer = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   cross_attention_frequency=1, encoder_hidden_size=128, max_position_embeddings=64)
    specials = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if name == TINY_T5:
        # No tie_word_embeddings=False (Flan-T5's): transformers 5 ties T5's output layer to its N(0, 1) embeddings
        # anyway, and only the original T5's d_model**-0.5 output scaling keeps a random model's first loss near
        # log(vocab) (~8) instead of 64; the demo then reached 0.83 held-out exact match instead of 0.34 (README).
        text = T5Config(vocab_size=len(tokenizer), d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2,
                        num_heads=4, feed_forward_proj="gated-gelu",
                        decoder_start_token_id=tokenizer.pad_token_id, **specials)
    else:
        newline = tokenizer(END_OF_CAPTION, add_special_tokens=False)["input_ids"]
        assert len(newline) == 1, "the tiny BPE splits '\\n'"
        text = OPTConfig(vocab_size=len(tokenizer), hidden_size=128, ffn_dim=256, num_hidden_layers=2,
                         num_attention_heads=4, word_embed_proj_dim=128, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=newline[0])
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                       num_query_tokens=TINY_QUERIES, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def full_size_config(language_model: str = "opt") -> Blip2Config:
    """The architecture of Salesforce/blip2-opt-2.7b ("opt") or blip2-flan-t5-xl ("t5"), for random-weight
    benchmarks and memory arithmetic (3.745 B / 3.877 B parameters); nothing is downloaded."""
    from transformers import OPTConfig, T5Config

    if language_model == "t5":
        text = T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                        num_heads=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
        image_token = 32100
    else:
        text = OPTConfig(vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                         num_attention_heads=32, word_embed_proj_dim=2560, max_position_embeddings=2048,
                         eos_token_id=50118)
        image_token = 50265
    return Blip2Config(text_config=text.to_dict(), num_query_tokens=32, image_token_index=image_token,
                       vision_config={"initializer_range": 0.02})


def tiny(name: str, seed: int = 0) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """A tiny preset: random weights seeded by `seed`, an offline BPE tokenizer; its processor inserts the
    placeholders (num_query_tokens set)."""
    tokenizer = preset_tokenizer(name)
    config = tiny_config(name, tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config)
        # transformers starts the query tokens at zero: all queries equal, so the Q-Former's first LayerNorm sees a
        # constant and gives them huge, identical gradients. LAVIS draws them from N(0, initializer_range).
        torch.nn.init.normal_(model.query_tokens, std=config.qformer_config.initializer_range)
    _eager(model)
    # Blip2Processor reuses it instead of adding another <image>; an AddedToken, as Blip2Processor makes its own,
    # because its __call__ reads `.content` (a plain string broke processor(images=..., text=...)).
    tokenizer.image_token = AddedToken(IMAGE_TOKEN, normalized=False, special=True)
    processor = Blip2Processor(image_processor=image_processor(TINY_IMAGE_SIZE), tokenizer=tokenizer,
                               num_query_tokens=config.num_query_tokens)
    return model, processor


# --- loading ----------------------------------------------------------------------------------------------------

def load(name: str, *, seed: int = 0) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """A tiny preset, a save_pretrained directory or a hub id (its model_type already checked to be blip-2).

    Raises:
        CaptuneError: weights missing / unexpected (named), an unreadable checkpoint, or a processor whose image
            placeholder does not match the model's.
    """
    if name in PRESETS:
        return tiny(name, seed)
    local = Path(name).expanduser().is_dir()
    try:
        model, info = Blip2ForConditionalGeneration.from_pretrained(name, local_files_only=local,
                                                                    output_loading_info=True)
        processor = Blip2Processor.from_pretrained(name, local_files_only=local)
    except OSError as exc:
        raise CaptuneError(f"cannot load model '{name}': {first_line(exc)}") from exc
    check_loading_info(name, info)
    _eager(model)
    if not isinstance(processor, Blip2Processor):
        raise CaptuneError(f"'{name}' does not carry a Blip2Processor; captune fine-tunes it as "
                           "Blip2ForConditionalGeneration")
    if processor.num_query_tokens is None:
        # Older processors were saved without it: they insert no <image> placeholders and the model would
        # silently caption (and train on) text alone.
        log.warning("%s: its processor has no num_query_tokens; using the model's %d so that images are seen",
                    name, model.config.num_query_tokens)
        processor.num_query_tokens = model.config.num_query_tokens
    image_id = image_token_id(processor)
    if image_id != model.config.image_token_id:
        raise CaptuneError(f"'{name}': the processor's image token {IMAGE_TOKEN} is id {image_id} but the model "
                           f"expects {model.config.image_token_id}: save the processor and model together")
    return model, processor


def _eager(model) -> None:
    """transformers picks SDPA for BLIP-2 by itself; the contract hands models back eager (captune.speed's
    `sdpa` switch, on by default, decides)."""
    model.set_attn_implementation("eager")


def image_token_id(processor) -> int:
    token = processor.image_token
    return processor.tokenizer.convert_tokens_to_ids(getattr(token, "content", token))


def is_encoder_decoder(processor) -> bool:
    """T5 variant: its tokenizer appends eos and has no bos (OPT's prepends bos `</s>`)."""
    return processor.tokenizer.bos_token_id is None or not _adds_bos(processor.tokenizer)


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def image_size(processor) -> int:
    return processor.image_processor.size["height"]


def pixel_values(processor, images: list) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


# --- training batches ---------------------------------------------------------------------------------------------

def _queries(processor) -> int:
    if not processor.num_query_tokens:
        raise CaptuneError("this Blip2Processor has no num_query_tokens: it would insert no <image> placeholders and "
                           "the model would train on text alone; set processor.num_query_tokens to the model's "
                           "config.num_query_tokens (captune's loader does)")
    return processor.num_query_tokens


def _with_placeholders(processor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`<image>` x num_query_tokens before every row (never padded nor truncated, as Blip2Processor does)."""
    queries = _queries(processor)
    block = torch.full((ids.shape[0], queries), image_token_id(processor), dtype=ids.dtype)
    return torch.cat([block, ids], 1), torch.cat([torch.ones_like(block), mask], 1)


def prompt_length(tokenizer, prompt: str) -> int:
    """OPT: text positions before the caption (bos `</s>` plus the prompt's tokens)."""
    return len(tokenizer(prompt.strip(), add_special_tokens=True)["input_ids"]) if prompt.strip() else 1


def tokenize(processor, captions: list[str], *, prompt: str, max_tokens: int) -> dict[str, torch.Tensor]:
    """A training batch's text side (see the module docstring for each variant's layout)."""
    tokenizer = processor.tokenizer
    if is_encoder_decoder(processor):
        return _tokenize_t5(processor, captions, prompt=prompt, max_tokens=max_tokens)
    prompt_tokens = prompt_length(tokenizer, prompt)
    if prompt_tokens >= max_tokens:
        raise ValueError(f"prompt {prompt!r} fills all {max_tokens} caption tokens: raise max_caption_tokens")
    # Joined with one space whatever the prompt's trailing whitespace (YAML and shells strip it); "\n" ends it.
    text = [(f"{prompt.strip()} {caption}" if prompt.strip() else caption) + END_OF_CAPTION for caption in captions]
    encoded = tokenizer(text, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt",
                        padding_side="right")
    text_ids, text_mask = encoded["input_ids"], encoded["attention_mask"]
    text_labels = text_ids.masked_fill(text_mask == 0, IGNORE_INDEX)
    text_labels[:, :prompt_tokens] = IGNORE_INDEX
    input_ids, attention_mask = _with_placeholders(processor, text_ids, text_mask)
    labels = torch.cat([torch.full((len(captions), _queries(processor)), IGNORE_INDEX), text_labels], 1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _tokenize_t5(processor, captions: list[str], *, prompt: str, max_tokens: int) -> dict[str, torch.Tensor]:
    tokenizer = processor.tokenizer
    encoder = tokenizer([prompt.strip()] * len(captions), return_tensors="pt")
    input_ids, attention_mask = _with_placeholders(processor, encoder["input_ids"], encoder["attention_mask"])
    # max_tokens - 1: the decoder's start token takes one position, as BLIP's [DEC] does.
    target = tokenizer(list(captions), padding="longest", truncation=True, max_length=max(max_tokens - 1, 1),
                       return_tensors="pt", padding_side="right")
    start = torch.full((len(captions), 1), start_token_id(processor), dtype=target["input_ids"].dtype)
    decoder_input_ids = torch.cat([start, target["input_ids"]], 1)
    decoder_attention_mask = torch.cat([torch.ones_like(start), target["attention_mask"]], 1)
    labels = decoder_input_ids.masked_fill(decoder_attention_mask == 0, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": decoder_attention_mask, "labels": labels}


def caption_lengths(tokenizer, captions: list[str], prompt: str) -> list[int]:
    """Positions each caption's text row takes before truncation (max_caption_tokens counts these; the `<image>`
    placeholders come on top). OPT: bos `</s>`, the prompt, the caption, "\n". T5: the decoder's start token, the
    caption, `</s>` (the prompt is the encoder's)."""
    if not _adds_bos(tokenizer):
        return [len(ids) + 1 for ids in tokenizer(list(captions))["input_ids"]]
    text = [(f"{prompt.strip()} {caption}" if prompt.strip() else caption) + END_OF_CAPTION for caption in captions]
    return [len(ids) for ids in tokenizer(text)["input_ids"]]


def start_token_id(processor) -> int:
    """OPT: bos `</s>` (generate() appends text_config.bos_token_id to the placeholders); T5: the decoder's start
    token, pad (decoder_start_token_id)."""
    tokenizer = processor.tokenizer
    return tokenizer.pad_token_id if is_encoder_decoder(processor) else tokenizer.bos_token_id


def target_tokens(batch: dict) -> torch.Tensor:
    return _target_tokens(batch["labels"])


def loss_sum(model, batch: dict, *, label_smoothing: float) -> torch.Tensor:
    """Summed next-token cross entropy: logits at t predict label t + 1 (placeholders and decoder start -100)."""
    text = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
            if k in batch}
    outputs = model(pixel_values=batch["pixel_values"], **text)
    return caption_loss_sum(outputs.logits, batch["labels"], label_smoothing)


def sequence_nll(model, batch: dict) -> torch.Tensor:
    """-log p per row over `loss_sum`'s positions (see captune.models)."""
    text = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
            if k in batch}
    outputs = model(pixel_values=batch["pixel_values"], **text)
    return caption_sequence_nll(outputs.logits, batch["labels"])


# --- generation -------------------------------------------------------------------------------------------------

def generation_inputs(processor, batch: int, prompt: str) -> dict[str, torch.Tensor]:
    """What generate() gets besides pixel_values: the placeholders, then OPT's bos + prompt or T5's encoder prompt."""
    text = processor.tokenizer([prompt.strip()] * batch, return_tensors="pt")
    input_ids, attention_mask = _with_placeholders(processor, text["input_ids"], text["attention_mask"])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def end_token_id(processor) -> int:
    """The token a caption ends with: OPT's "\\n" (LAVIS), T5's eos `</s>`."""
    if is_encoder_decoder(processor):
        return processor.tokenizer.eos_token_id
    return processor.tokenizer(END_OF_CAPTION, add_special_tokens=False)["input_ids"][-1]


@torch.inference_mode()
def generate(model, processor, pixel_values: torch.Tensor, options) -> list[str]:
    """Caption preprocessed images; for OPT the returned rows hold the inputs, which are cut off; T5 decodes the
    caption alone (the prompt is the encoder's)."""
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    inputs = {k: v.to(parameter.device) for k, v in
              generation_inputs(processor, pixel_values.shape[0], options.prompt).items()}
    # Stop where training captions end, whatever generation_config a checkpoint carries.
    output = model.generate(pixel_values=pixel_values, **inputs, eos_token_id=end_token_id(processor),
                            **options.generate_kwargs())
    if not model.config.is_encoder_decoder:
        output = output[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.tokenizer.batch_decode(output, skip_special_tokens=True)]


# --- modes and levers ---------------------------------------------------------------------------------------------

def set_trainable(model, mode: str) -> None:
    """`full`: everything; `frozen-vision`: all but the ViT; `frozen-lm`: the ViT, the Q-Former (and its query
    tokens) and the projection into the language model, which stays frozen (the BLIP-2 paper's fine-tuning)."""
    if mode == "full":
        model.requires_grad_(True)
    elif mode == "frozen-vision":
        model.requires_grad_(True)
        model.vision_model.requires_grad_(False)
    elif mode == "frozen-lm":
        model.requires_grad_(True)
        model.language_model.requires_grad_(False)
    else:
        raise CaptuneError(f"unknown train.mode {mode!r} for BLIP-2: use {', '.join(MODES)}")


def lora_pattern(targets: list[str], vision: bool) -> str:
    """The language model's attention projections named in `targets` (OPT's self-attention; T5's self- and
    cross-attention; either naming), with `vision` the ViT's attention too (qkv, projection)."""
    names = sorted({n for t in targets for n in (t, _LM_ALIASES.get(t, t), *[k for k, v in _LM_ALIASES.items()
                                                                            if v == t])})
    alternatives = "|".join(re.escape(n) for n in names)
    pattern = (r"language_model\.(model\.decoder\.layers\.\d+\.self_attn|"
               rf"(encoder|decoder)\.block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention))\.({alternatives})")
    if vision:
        pattern += rf"|vision_model\.encoder\.layers\.\d+\.self_attn\.({'|'.join(VISION_TARGETS)})"
    return pattern


def vision_tower(model) -> torch.nn.Module:
    """The ViT: grouped caption sampling repeats its output rows (the Q-Former then runs per caption row)."""
    return model.vision_model


def int8_targets(model) -> dict[str, torch.nn.Module]:
    """The ViT and the language model's transformer stacks; the LM head (tied to the embeddings in OPT) and the
    Q-Former (kept in fp32 by transformers) stay as they are."""
    lm = model.language_model
    if model.config.is_encoder_decoder:
        return {"vision_model": model.vision_model, "language_model.encoder": lm.encoder,
                "language_model.decoder": lm.decoder}
    return {"vision_model": model.vision_model, "language_model.model.decoder.layers": lm.model.decoder.layers}


# transformers' BLIP-2 attention modules read `config._attn_implementation` on every call, so SDPA is theirs:
# the replacement forward runs the module's own forward with that switched to "sdpa" for the call (the masks the
# eager path builds are additive float masks, which SDPA takes as they are).
_NATIVE_SDPA = ("Blip2Attention", "Blip2QFormerMultiHeadAttention", "OPTAttention", "T5Attention")


def sdpa_forward(module):
    """SDPA for BLIP-2's ViT, Q-Former, OPT and T5 attention (transformers' own sdpa path); None elsewhere."""
    return native_sdpa_forward(module, _NATIVE_SDPA)


def usage_snippet(prompt: str, generation: dict) -> str:
    """The model card's runnable plain-transformers block: `processor(images=..., text=prompt)` inserts the
    placeholders (num_query_tokens is saved with the processor)."""
    kwargs = ", ".join(f"{k}={v}" for k, v in generation.items())
    return f"""```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

MODEL = "path/to/this/directory"  # or the Hub repo id you uploaded it to
processor = AutoProcessor.from_pretrained(MODEL)
model = AutoModelForImageTextToText.from_pretrained(MODEL).eval()

image = Image.open("photo.jpg").convert("RGB")
inputs = processor(images=image, text={prompt.strip()!r}, return_tensors="pt")
output = model.generate(**inputs{', ' + kwargs if kwargs else ''})
if not model.config.is_encoder_decoder:  # OPT returns the placeholders and prompt first
    output = output[:, inputs["input_ids"].shape[1]:]
print(processor.decode(output[0], skip_special_tokens=True).strip())
```"""
