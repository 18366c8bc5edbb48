"""SmolVLM / Idefics3 (`Idefics3ForConditionalGeneration`): the family contract of `captune.models` for a
chat-template VLM, captioning as one user turn (the image and an instruction) answered by one assistant turn.

SmolVLM-256M/500M-Instruct (model_type idefics3) are a SigLIP ViT, a pixel-shuffle connector (each 4x4 block of
patches becomes one text-width row: 64 image tokens for a 512-px tile) and a SmolLM2 (Llama) decoder. A training row
is the processor's chat template rendered for

    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]},
     {"role": "assistant", "content": [{"type": "text", "text": caption}]}]

which SmolVLM's template writes as `<|im_start|>User:<image>{instruction}<end_of_utterance>\\nAssistant: {caption}
<end_of_utterance>\\n`, with the processor expanding `<image>` into `<fake_token_around_image><global-img>` + `<image>`
x image_seq_len + `<fake_token_around_image>`. captune builds the row as two pieces:

    prompt   the template with add_generation_prompt=True (`...<end_of_utterance>\\nAssistant:`), image expanded:
             exactly what generate() continues from; every label here is -100 (role markers, image tokens,
             instruction).
    reply    the rest of the rendered conversation up to and including the assistant's `<end_of_utterance>`
             (` {caption}<end_of_utterance>`): the only labels (unshifted: position t's logits predict label t+1).
             The template's trailing "\\n" after the turn is dropped: nothing is learned from it and generation
             stops at `<end_of_utterance>`.

Tokenizing the two pieces apart keeps the prompt's tokens identical to generation's (a BPE merge across the
boundary would otherwise shift the first label). Right padding for training; `data.max_caption_tokens` counts the
reply's tokens (end-of-turn included), the prompt comes on top. The instruction is `data.prompt` ("Describe this image
in one sentence." when empty).

Images: one 512-px tile per image (the processor's image splitting is switched off on load, so every image gives
(3, S, S) pixels and image_seq_len tokens; SmolVLM's default splitting into up to 4x4 tiles would multiply the tokens
by up to 17 and give each image its own number of rows).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

from ..errors import CaptuneError
from .blip import check_loading_info
from .common import IGNORE_INDEX, caption_loss_sum, caption_sequence_nll, first_line, native_sdpa_forward
from .common import target_tokens as _target_tokens

NAME = "smolvlm"
TITLE = "SmolVLM (Idefics3)"
MODEL_CLASS = "Idefics3ForConditionalGeneration"
TINY = "tiny-smolvlm"
PRESETS = (TINY,)
# "sdpa": transformers' own SDPA path for the Llama decoder and the SigLIP-style vision attention, switched per call.
# "int8": the ViT and decoder Linears. "grouped": one ViT pass per image (see `_logits`). No "beam_cache": no
# cross-attention (the image rows sit in the self-attention cache, which beam search reorders).
SPEED_LEVERS = frozenset({"sdpa", "int8", "grouped"})
DEFAULT_INSTRUCTION = "Describe this image in one sentence."
IMAGE_TOKEN = "<image>"
END_OF_TURN = "<end_of_utterance>"
BOS = "<|im_start|>"
# The tiny preset's chat template, written as SmolVLM-Instruct's chat_template.json writes turns (role, ":" or ": "
# before text, the content, <end_of_utterance>, "\n"; generation prompt "Assistant:"), reproduced here without the
# Hub to compare against. A real checkpoint's rows come from its own saved template, not from this one.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
TINY_IMAGE_SIZE = 64
TINY_PATCH = 8
TINY_SCALE = 2  # pixel shuffle: 8x8 patches -> 4x4 = 16 image tokens
LORA_TARGET_NAMES = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
VISION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

# Pretrained SmolVLM fine-tuned as a captioner: full fine-tuning at 1e-5 (SmolVLM's own fine-tuning notebook uses 1e-4
# for LoRA adapters), greedy decoding as the Instruct checkpoints are used. Long captions: 50-200 words are ~70-280
# SmolLM2 tokens, so 320 reply tokens train them whole and 300 new tokens write them.
_DEFAULTS = {
    "train.lr": 1e-5,
    "train.batch_size": 8,
    "train.lora_targets": "q_proj,k_proj,v_proj,o_proj",
    "data.max_caption_tokens": 320,
    "eval.num_beams": 1,
    "eval.max_new_tokens": 300,
    "eval.min_new_tokens": 1,
}
# The random tiny preset learns the shapes task at 1e-3 (see README: measured with `captune demo`); 2-3 word captions.
_TINY_DEFAULTS = {**_DEFAULTS, "train.lr": 1e-3, "train.batch_size": 16, "eval.max_new_tokens": 12}


def defaults(name: str) -> dict[str, object]:
    """Config values for fields the user left unset (see captune.models)."""
    return dict(_TINY_DEFAULTS if name == TINY else _DEFAULTS)


def instruction_of(prompt: str) -> str:
    """The user turn's instruction a `data.prompt` stands for: empty means DEFAULT_INSTRUCTION."""
    return prompt.strip() or DEFAULT_INSTRUCTION


def messages(prompt: str, caption: str | None = None) -> list[dict]:
    """The conversation: a user turn (image, instruction) and, when `caption` is given, the assistant's reply."""
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction_of(prompt)}]}]
    if caption is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    return turns


# --- tiny preset ------------------------------------------------------------------------------------------------

def tiny_tokenizer():
    """SmolVLM's special tokens over captune's offline byte-level BPE: <|endoftext|> pad, <|im_start|> bos,
    <end_of_utterance> eos (the end of every turn, where generation stops), <image>, <fake_token_around_image>,
    <global-img>; no special tokens added on encoding (the chat template writes <|im_start|> itself)."""
    from .tiny_tokenizers import bpe_tokenizer

    return bpe_tokenizer(bos=BOS, eos=END_OF_TURN, pad="<|endoftext|>", unk="<unk>",
                         extra_special=("<fake_token_around_image>", IMAGE_TOKEN, "<global-img>"), add_bos=False)


def image_processor(size: int):
    """Idefics3's image processor with splitting off: one size x size tile per image (mean/std 0.5 as SmolVLM);
    the PIL backend where torchvision is absent."""
    try:
        import torchvision  # noqa: F401
        from transformers import Idefics3ImageProcessor as Processor
    except Exception:  # torchvision missing or unusable next to this torch build
        from transformers import Idefics3ImageProcessorPil as Processor
    return Processor(do_image_splitting=False, size={"longest_edge": size}, max_image_size={"longest_edge": size},
                     image_mean=[0.5] * 3, image_std=[0.5] * 3)


def tiny_processor() -> Idefics3Processor:
    seq_len = (TINY_IMAGE_SIZE // TINY_PATCH) ** 2 // TINY_SCALE ** 2
    return Idefics3Processor(image_processor=image_processor(TINY_IMAGE_SIZE), tokenizer=tiny_tokenizer(),
                             image_seq_len=seq_len, chat_template=CHAT_TEMPLATE)


def preset_tokenizer(name: str):
    return tiny_processor().tokenizer


def tiny_config(processor) -> Idefics3Config:
    """A small Idefics3: a 2-layer 64-wide ViT on 64-px images (8-px patches, pixel shuffle 2: 16 image tokens) and a
    2-layer 128-wide Llama with 2 key/value heads (SmolLM2 uses grouped-query attention too), untied LM head."""
    tokenizer = processor.tokenizer
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH)
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    return Idefics3Config(vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
                          scale_factor=TINY_SCALE, pad_token_id=tokenizer.pad_token_id)


# SmolVLM's decoders (SmolLM2-135M, -360M): width, MLP width, layers, heads, key/value heads.
_DECODERS = {"256M": (576, 1536, 30, 9, 3), "500M": (960, 2560, 32, 15, 5)}


def full_size_config(size: str = "256M", vocab_size: int = 49280, image_token_id: int = 49190) -> Idefics3Config:
    """The architecture of HuggingFaceTB/SmolVLM-{size}-Instruct as its model card describes it (SigLIP base-patch16
    at 512 px, pixel shuffle 4: 64 image tokens a tile; SmolLM2-135M or -360M, untied LM head), for random-weight
    benchmarks and parameter arithmetic (256.5 M / 507.5 M parameters, counted on the meta device); nothing is
    downloaded, so the vocabulary size and image token id are parameters (the values given are SmolVLM's)."""
    width, mlp, layers, heads, kv_heads = _DECODERS[size]
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=512, patch_size=16)
    text = dict(model_type="llama", vocab_size=vocab_size, hidden_size=width, intermediate_size=mlp,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=False)
    return Idefics3Config(vision_config=vision, text_config=text, image_token_id=image_token_id, scale_factor=4)


def tiny(seed: int = 0) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """The `tiny-smolvlm` preset: random weights seeded by `seed`, an offline BPE tokenizer."""
    processor = tiny_processor()
    config = tiny_config(processor)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
    _eager(model)
    return model, processor


# --- loading ----------------------------------------------------------------------------------------------------

def load(name: str, *, seed: int = 0) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """The preset, a save_pretrained directory or a hub id (its model_type already checked to be idefics3).

    Raises:
        CaptuneError: missing/unexpected weights (named), no Idefics3 processor, a processor without a chat template,
            or one whose image token or image_seq_len disagrees with the model.
    """
    if name == TINY:
        return tiny(seed)
    local = Path(name).expanduser().is_dir()
    from transformers import AutoProcessor

    try:
        model, info = Idefics3ForConditionalGeneration.from_pretrained(name, local_files_only=local,
                                                                       output_loading_info=True)
        processor = AutoProcessor.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise CaptuneError(f"cannot load SmolVLM/Idefics3 model '{name}': {first_line(exc)}") from exc
    check_loading_info(name, info)
    if not isinstance(processor, Idefics3Processor):
        raise CaptuneError(f"'{name}' does not carry an Idefics3Processor (found {type(processor).__name__})")
    _eager(model)
    check_processor(name, model, processor)
    return model, processor


def _eager(model) -> None:
    """transformers picks SDPA by itself; the contract hands models back eager (captune.speed's `sdpa` switch)."""
    model.set_attn_implementation("eager")


def image_tokens(model) -> int:
    """Image rows one tile gives: (image_size / patch_size)^2 / scale_factor^2 (64 for SmolVLM at 512 px)."""
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // model.config.scale_factor ** 2


def check_processor(name: str, model, processor) -> None:
    """One tile per image (splitting switched off: see the module docstring), a chat template, and an image_seq_len
    and image token that match the model.

    Raises:
        CaptuneError: no chat template, a wrong image_seq_len or image token id.
    """
    processor.image_processor.do_image_splitting = False
    side = processor.image_processor.max_image_size["longest_edge"]
    processor.image_processor.size = {"longest_edge": side}
    if not processor.chat_template:
        raise CaptuneError(f"'{name}': its processor has no chat template: add SmolVLM's chat_template.json (captune "
                           "writes the user and assistant turns with it)")
    expected = image_tokens(model)
    if processor.image_seq_len != expected:
        raise CaptuneError(f"'{name}': image_seq_len is {processor.image_seq_len} but the vision tower gives "
                           f"{expected} rows for {side}-px tiles: set \"image_seq_len\": {expected} in its "
                           "processor_config.json")
    if processor.image_token_id != model.config.image_token_id:
        raise CaptuneError(f"'{name}': the tokenizer's image token {IMAGE_TOKEN!r} has id {processor.image_token_id}, "
                           f"the model expects {model.config.image_token_id}")


def image_size(processor) -> int:
    return processor.image_processor.max_image_size["longest_edge"]


def pixel_values(processor, images: list) -> torch.Tensor:
    """(N, 3, S, S): one tile per image. The processor's (N, 1, 3, S, S) batch-of-image-lists layout is restored in
    `_forward`; with one square tile per image the pixel attention mask is all ones, the model's own default."""
    return processor.image_processor([[image] for image in images], return_tensors="pt")["pixel_values"][:, 0]


# --- training batches ---------------------------------------------------------------------------------------------

def prompt_text(processor, prompt: str) -> str:
    """The user turn and the generation prompt as the chat template writes them, `<image>` still one token."""
    return processor.apply_chat_template(messages(prompt), add_generation_prompt=True, tokenize=False)


def reply_text(processor, prompt: str, caption: str) -> str:
    """What the template writes after the generation prompt for an assistant reply `caption`, up to and including
    its end-of-turn token (` caption<end_of_utterance>` for SmolVLM's template).

    Raises:
        CaptuneError: a template whose full conversation does not start with its generation prompt.
    """
    head = prompt_text(processor, prompt)
    full = processor.apply_chat_template(messages(prompt, caption), tokenize=False)
    if not full.startswith(head) or END_OF_TURN not in full[len(head):]:
        raise CaptuneError("this processor's chat template does not write the assistant turn after its generation "
                           f"prompt and end it with {END_OF_TURN}: captune cannot tell the reply's tokens apart")
    rest = full[len(head):]
    return rest[:rest.index(END_OF_TURN) + len(END_OF_TURN)]


def _expand_image(processor, text: str) -> str:
    """`<image>` as the processor expands it for one tile: fake token, <global-img>, image_seq_len x <image>, fake
    token."""
    image = (processor.fake_image_token + processor.global_image_tag + IMAGE_TOKEN * processor.image_seq_len
             + processor.fake_image_token)
    return text.replace(IMAGE_TOKEN, image)


def prompt_ids(processor, prompt: str) -> list[int]:
    """The generation prompt's tokens, image expanded: every training row's head and generate()'s input."""
    return processor.tokenizer(_expand_image(processor, prompt_text(processor, prompt)),
                               add_special_tokens=False)["input_ids"]


def reply_ids(processor, prompt: str, captions: list[str]) -> list[list[int]]:
    return processor.tokenizer([reply_text(processor, prompt, c) for c in captions],
                               add_special_tokens=False)["input_ids"]


def tokenize(processor, captions: list[str], *, prompt: str, max_tokens: int) -> dict[str, torch.Tensor]:
    """Prompt then reply, right padding (see the module docstring). `max_tokens` counts the reply's tokens; a longer
    reply is cut before its end-of-turn token, which stays."""
    tokenizer = processor.tokenizer
    if max_tokens < 2:
        raise ValueError(f"max_caption_tokens {max_tokens} leaves no room for a caption and {END_OF_TURN}: raise it")
    head = prompt_ids(processor, prompt)
    replies = [r if len(r) <= max_tokens else r[:max_tokens - 1] + r[-1:] for r in reply_ids(processor, prompt, captions)]
    width = len(head) + max(len(r) for r in replies)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(processor)
    input_ids = torch.full((len(captions), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, reply in enumerate(replies):
        end = len(head) + len(reply)
        input_ids[row, :end] = torch.tensor(head + reply)
        attention_mask[row, :end] = 1
        labels[row, len(head):end] = torch.tensor(reply)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def caption_lengths(tokenizer, captions: list[str], prompt: str) -> list[int]:
    """Reply tokens each caption's row takes before truncation (what `max_caption_tokens` limits): the caption and
    the end-of-turn token. Counted from the template's reply text, which is the caption with a leading space."""
    return [len(ids) for ids in tokenizer([f" {c}{END_OF_TURN}" for c in captions],
                                           add_special_tokens=False)["input_ids"]]


def start_token_id(processor) -> int:
    """The template's first token (<|im_start|> for SmolVLM), read off the prompt itself rather than the tokenizer's
    bos setting: the first token of every row, in training and in generate()'s prompt."""
    return prompt_ids(processor, "")[0]


def end_of_turn_id(processor) -> int:
    """<end_of_utterance>: where every reply ends, so where generate() stops (passed explicitly: a checkpoint's
    generation config may name another eos)."""
    return processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)


def target_tokens(batch: dict) -> torch.Tensor:
    return _target_tokens(batch["labels"])


def _logits(model, batch: dict) -> torch.Tensor:
    """The forward's logits. Idefics3 takes pixel_values as (batch, images per row, 3, S, S): one image per row.

    Grouped batches (fewer images than caption rows; `speed.share_images` repeats the ViT's output rows) cannot go
    through that path: Idefics3 splits the connector's output by the number of pixel rows it was given, which the
    repetition no longer matches. For them the ViT and the connector run here, on the unwrapped model, and their rows
    enter the forward as `mm_encoder_outputs`, the model's own way to take precomputed image features; the decoder
    still runs through the (DDP, peft) wrapper, and the ViT's and connector's gradients flow back through the
    features as in the one-call path."""
    pixels, ids = batch["pixel_values"], batch["input_ids"]
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
    if pixels.shape[0] == ids.shape[0]:
        return model(pixel_values=pixels.unsqueeze(1), **inputs).logits
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    inner = _inner(getattr(model, "module", model)).model
    hidden = inner.vision_model(pixel_values=pixels.to(inner.dtype)).last_hidden_state  # rows repeated by the hook
    features = inner.connector(hidden)
    image = BaseModelOutputWithPooling(pooler_output=[features.reshape(-1, features.shape[-1])])
    return model(mm_encoder_outputs={"image": image}, **inputs).logits


def loss_sum(model, batch: dict, *, label_smoothing: float) -> torch.Tensor:
    """Summed next-token cross entropy: logits at t predict label t + 1 (everything before the reply -100)."""
    return caption_loss_sum(_logits(model, batch), batch["labels"], label_smoothing)


def sequence_nll(model, batch: dict) -> torch.Tensor:
    """-log p per row over `loss_sum`'s positions (see captune.models)."""
    return caption_sequence_nll(_logits(model, batch), batch["labels"])


# --- generation -------------------------------------------------------------------------------------------------

def generation_inputs(processor, batch: int, prompt: str) -> dict[str, torch.Tensor]:
    """The generation prompt, one row per image. Every row has the same instruction, hence the same tokens: there is
    no padding to place (a batch of different prompts would need the tokenizer's left padding, as the plain-
    transformers snippet in the model card uses)."""
    ids = torch.tensor(prompt_ids(processor, prompt)).expand(batch, -1).clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.inference_mode()
def generate(model, processor, pixel_values: torch.Tensor, options) -> list[str]:
    """Caption preprocessed images: the prompt is cut off the returned rows, special tokens (the end-of-turn) are
    skipped and whitespace stripped, leaving the assistant's reply alone."""
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype).unsqueeze(1)
    inputs = {k: v.to(parameter.device) for k, v in
              generation_inputs(processor, pixel_values.shape[0], options.prompt).items()}
    output = model.generate(pixel_values=pixel_values, **inputs, eos_token_id=end_of_turn_id(processor),
                            **options.generate_kwargs())
    output = output[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.tokenizer.batch_decode(output, skip_special_tokens=True)]


# --- modes and levers ---------------------------------------------------------------------------------------------

def set_trainable(model, mode: str) -> None:
    """`full`: everything trains; `frozen-vision`: all but the ViT (the connector still trains)."""
    if mode == "full":
        model.requires_grad_(True)
    elif mode == "frozen-vision":
        model.requires_grad_(True)
        model.model.vision_model.requires_grad_(False)
    else:
        raise CaptuneError(f"unknown train.mode {mode!r} for SmolVLM/Idefics3: use full, frozen-vision or lora")


def lora_pattern(targets: list[str], vision: bool) -> str:
    """The Llama decoder's attention and MLP Linears named in `targets` (q_proj, k_proj, v_proj, o_proj, gate_proj,
    up_proj, down_proj); with `vision`, the ViT's attention too (q_proj, k_proj, v_proj, out_proj)."""
    names = "|".join(re.escape(t) for t in targets)
    pattern = rf"model\.text_model\.layers\.\d+\.(self_attn|mlp)\.({names})"
    if vision:
        pattern += rf"|model\.vision_model\.encoder\.layers\.\d+\.self_attn\.({'|'.join(VISION_TARGETS)})"
    return pattern


def _inner(model):
    # Under peft, `model.model` is the wrapped Idefics3ForConditionalGeneration, not its Idefics3Model.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vision_tower(model) -> torch.nn.Module:
    """The ViT: grouped caption sampling repeats its output rows (before the connector) per caption."""
    return _inner(model).model.vision_model


def int8_targets(model) -> dict[str, torch.nn.Module]:
    """The ViT and the decoder's layers; the connector and the LM head stay fp32."""
    return {"model.vision_model": model.model.vision_model, "model.text_model": model.model.text_model}


# transformers' Llama and Idefics3 vision attention read `config._attn_implementation` on every call, so SDPA is
# theirs: the replacement forward runs the module's own forward with it switched to "sdpa" for the call.
_NATIVE_SDPA = ("LlamaAttention", "Idefics3VisionAttention")


def sdpa_forward(module):
    """SDPA for Idefics3's Llama and vision attention modules (transformers' own sdpa path); None elsewhere."""
    return native_sdpa_forward(module, _NATIVE_SDPA)


def usage_snippet(prompt: str, generation: dict) -> str:
    """The model card's runnable plain-transformers block: the processor's chat template with the generation prompt,
    the reply being what follows the prompt."""
    kwargs = "".join(f", {k}={v}" for k, v in generation.items())
    return f"""```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

MODEL = "path/to/this/directory"  # or the Hub repo id you uploaded it to
processor = AutoProcessor.from_pretrained(MODEL)
model = AutoModelForImageTextToText.from_pretrained(MODEL).eval()

image = Image.open("photo.jpg").convert("RGB")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {instruction_of(prompt)!r}}}]}}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[[image]], text=[text], return_tensors="pt")
end_of_turn = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")  # the reply ends there
output = model.generate(**inputs, eos_token_id=end_of_turn{kwargs})
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
```"""
