"""Model families: one module per captioning architecture, chosen from the checkpoint's `config.model_type`.

The loop, evaluation, captioning, serving and reports never name a family: they ask `family_for(name)` (a preset
name, a model directory or a hub id) or `family_of(model)` (a loaded model) for the family module and call the
functions below on it. The families and the model types they own are listed once, in `MODEL_TYPES` and `PRESETS`.

The contract every family module (`models/<family>.py`) implements, as plain module-level functions and constants:

    NAME: str
        The family's name (e.g. "blip"): `family_module(NAME)` returns the module; the model card's tag.
    TITLE: str, MODEL_CLASS: str
        How the model card names it ("BLIP", "BlipForConditionalGeneration").
    PRESETS: tuple[str, ...]
        Offline tiny preset names the family owns (e.g. ("tiny",)); each must also be a key of `PRESETS` below.
    SPEED_LEVERS: frozenset[str]
        Which of captune's speed levers apply: "sdpa" (`sdpa_forward`), "beam_cache" (`generate` passes a cache that
        leaves image keys in place), "int8" (`int8_targets`), "grouped" (`vision_tower`: one ViT pass per image with
        several captions). A lever not listed is refused with a one-line error where a user asks for it.

    defaults(name: str) -> dict[str, object]
        Values for the config fields a user left unset (None), keyed by dotted config name: at least "train.lr",
        "train.batch_size", "train.lora_targets", "data.max_caption_tokens", "eval.max_new_tokens",
        "eval.min_new_tokens", "eval.num_beams". `name` is what `cfg.model.name` says, so a tiny preset can carry
        values under which it actually learns. Explicit flags and YAML always win (config.resolve_defaults).
    preset_tokenizer(name: str) -> PreTrainedTokenizerBase
        The tokenizer of one of the family's PRESETS, built offline and fast (no model): `captune check` counts
        caption lengths with it.
    load(name: str, *, seed: int = 0) -> tuple[PreTrainedModel, processor]
        `name` is one of the family's PRESETS (random weights seeded by `seed`, fully offline), a local directory
        written by save_pretrained, or a hub id, already known to be this family (`family_for` checked the
        model_type before any weights load). Missing or unexpected checkpoint weights raise CaptuneError naming
        them (load with `output_loading_info=True`), never a silent random init. The model comes back in eval-less
        default state, fp32, on the CPU, with eager attention (`captune.speed` switches SDPA on).
    image_size(processor) -> int
        The square side, in pixels, the processor resizes images to.
    pixel_values(processor, images: list[PIL.Image.Image]) -> torch.Tensor
        (len(images), 3, H, W) float32, as the model's forward takes them.
    tokenize(processor, captions: list[str], *, prompt: str, max_tokens: int) -> dict[str, torch.Tensor]
        The text side of a training batch, one row per caption, padded to the longest row (never to a fixed
        length), truncated to `max_tokens` positions. Keys: "input_ids", "attention_mask", "labels" and any other
        tensor the family's `loss` needs (never `token_type_ids` or other keys `generate()` refuses, unless `loss`
        and `generate` deal with them). `labels` has the shape of `input_ids` and is -100 at padding, at every
        prompt position, at image placeholder tokens and at the first position; elsewhere it equals `input_ids`
        (unshifted: position t's logits predict label t+1), unless the family's `loss_sum` and `target_tokens` say
        otherwise (an encoder-decoder's labels are decoder targets). The first input token is exactly the one
        `generate()` starts decoding from (`start_token_id`), so training never conditions on a context inference
        never sees. An empty caption ("") must tokenize (it is the all-ignored placeholder row).
    start_token_id(processor) -> int
        The first token of every decoded caption (BLIP: bos [DEC]).
    target_tokens(batch: dict) -> torch.Tensor
        The number (0-d integer tensor) of label positions `loss_sum` sums over, from the batch alone (before any
        forward: gradient accumulation divides a window's summed loss by its total, see train.backward_window).
    loss_sum(model, batch: dict, *, label_smoothing: float) -> torch.Tensor
        The next-token cross entropy summed (not averaged) over the target positions, from a batch `tokenize` +
        `pixel_values` built (moved to the model's device; "image_index" may be present, see `vision_tower`).
        0 when there are none. `model` may be wrapped (DDP, peft): call it, never its submodules, so gradient hooks
        run. Computed from the logits (`common.caption_loss_sum` for causal decoders) rather than the model's own
        loss so label smoothing is a training option; with label_smoothing=0, `common.mean_loss` (loss_sum /
        target_tokens) must equal the model's own loss where the model computes one.
    sequence_nll(model, batch: dict) -> torch.Tensor
        (rows,): -log p of each row's caption, summed over the positions `loss_sum` sums over, without smoothing
        (so sequence_nll(...).sum() == loss_sum(..., label_smoothing=0)); same batch and wrapping rules as
        `loss_sum`. SCST weighs each sampled caption's log-probability by its advantage with it.
    generate(model, processor, pixel_values: torch.Tensor, options: GenerationOptions) -> list[str]
        One caption per image row: decoding starts from `start_token_id` (plus the prompt's tokens when
        options.prompt is set), the prompt and special tokens are removed and whitespace stripped. `model` is
        unwrapped (maybe peft-merged or int8-quantized); pixel_values may be on any device.
    set_trainable(model, mode: str) -> None
        requires_grad for "full" and "frozen-vision" (and any family-specific non-LoRA mode); raises CaptuneError
        for a mode the family does not support.
    lora_pattern(targets: list[str], vision: bool) -> str
        A regex peft matches against full module names: the Linear layers named in `targets` (the family's own
        names, defaults(name)["train.lora_targets"]), in the vision encoder too when `vision` is True.
    vision_tower(model) -> torch.nn.Module | None
        The submodule whose output rows `speed.share_images` repeats for grouped caption sampling (None: "grouped"
        not in SPEED_LEVERS).
    int8_targets(model) -> dict[str, torch.nn.Module]
        The submodules whose nn.Linear layers `speed.quantize_int8` quantizes (empty: "int8" not in SPEED_LEVERS).
    usage_snippet(prompt: str, generation: dict) -> str
        A runnable ```python block for the model card that captions with plain transformers (no captune) exactly
        as `generate` does with that prompt and those generate() keyword arguments.
    sdpa_forward(module) -> callable | None
        A replacement forward (to bind to `module`) running its attention through
        torch.nn.functional.scaled_dot_product_attention with the same numbers, or None for modules it leaves alone.

Tests a new family must pass (tests/test_families.py runs the contract over every entry of PRESETS; add family
quirks to its own tests/test_<family>.py): the preset loads offline and is the real transformers class; a
save_pretrained round trip through `load` gives identical weights; `tokenize` labels are -100 at padding, prompt,
image placeholders and position 0, and the first input token equals `start_token_id`; `loss` with smoothing 0
equals the model's own loss given the same labels; two different images give different losses on the same caption
(the model really sees the image); `generate` returns prompt-free strings; every mode trains what it says; the
tiny preset learns the shapes task (tests/test_learning.py) under its `defaults`.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

from ..errors import CaptuneError

# config.model_type -> family module name (the one place the supported families are listed).
MODEL_TYPES = {
    "blip": "blip",
    "blip-2": "blip2",
    "git": "git",
    "florence2": "florence2",
    "paligemma": "paligemma",
    "idefics3": "smolvlm",
}
# Hub ids whose family is known without fetching their config.json: their defaults resolve offline (loading them
# still needs the cache or the Hub).
KNOWN_HUB_IDS = {
    "Salesforce/blip-image-captioning-base": "blip",
    "Salesforce/blip-image-captioning-large": "blip",
    "Salesforce/blip2-opt-2.7b": "blip2",
    "Salesforce/blip2-flan-t5-xl": "blip2",
    "microsoft/git-base": "git",
    "microsoft/git-base-coco": "git",
    "microsoft/git-large-coco": "git",
    **{f"florence-community/Florence-2-{size}": "florence2" for size in ("base", "base-ft", "large", "large-ft")},
    **{f"google/paligemma-3b-{kind}-{px}": "paligemma" for kind in ("pt", "mix") for px in (224, 448)},
    **{f"HuggingFaceTB/SmolVLM-{size}-{kind}": "smolvlm" for size in ("256M", "500M") for kind in ("Base", "Instruct")},
}
# Offline tiny presets (`--model tiny`) -> family module name.
PRESETS = {
    "tiny": "blip",
    "tiny-blip2": "blip2",
    "tiny-blip2-t5": "blip2",
    "tiny-git": "git",
    "tiny-florence2": "florence2",
    "tiny-paligemma": "paligemma",
    "tiny-smolvlm": "smolvlm",
}
SETTINGS_FILE = "captune.json"
TINY = "tiny"
DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"
"""What `--model` means when no flag, recipe or YAML names one."""
ADAPTER_CONFIG = "adapter_config.json"


def family_module(family: str) -> types.ModuleType:
    """The module of a family named in MODEL_TYPES / PRESETS (imported on first use: torch stays lazy)."""
    if family == "blip":
        from . import blip

        return blip
    if family == "blip2":
        from . import blip2

        return blip2
    if family == "git":
        from . import git

        return git
    if family == "florence2":
        from . import florence2

        return florence2
    if family == "paligemma":
        from . import paligemma

        return paligemma
    if family == "smolvlm":
        from . import smolvlm

        return smolvlm
    raise AssertionError(f"no family module {family!r}")


def supported() -> str:
    """The supported model types, for error messages."""
    return ", ".join(sorted(MODEL_TYPES))


def family_for_type(model_type: str | None, where: str) -> types.ModuleType:
    """The family owning `model_type`; `where` names the checkpoint in the one-line refusal.

    Raises:
        CaptuneError: model_type is not a supported family (exit code 2).
    """
    if model_type not in MODEL_TYPES:
        found = f"model_type '{model_type}'" if model_type else "no model_type"
        raise CaptuneError(f"{where} has {found}, which captune cannot fine-tune as a captioner; "
                           f"supported model types: {supported()} (or a preset: {', '.join(PRESETS)})")
    return family_module(MODEL_TYPES[model_type])


def family_for(name: str) -> types.ModuleType:
    """The family of a preset name, a model or LoRA-adapter directory, or a hub id, read from its config.json's
    `model_type` without loading any weights.

    Raises:
        CaptuneError: unsupported model_type; no such directory; no config.json; a hub id neither cached nor
            reachable.
    """
    if name in PRESETS:
        return family_module(PRESETS[name])
    return family_for_type(model_type_of(name), name)


def family_of(model) -> types.ModuleType:
    """The family of a loaded model (also under a peft or DDP wrapper), from `model.config.model_type`."""
    inner = getattr(model, "module", model)  # DDP
    config = getattr(inner, "config", None)
    return family_for_type(getattr(config, "model_type", None), type(inner).__name__)


def base_of_adapter(path: Path) -> tuple[str, int]:
    """(base model name, seed of its random init) that a LoRA adapter directory was trained on."""
    settings = load_captune_settings(str(path))
    base = settings.get("base_model")
    if not base:
        try:
            base = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError):
            base = None
    if not base:
        raise CaptuneError(f"LoRA adapter {path} does not name its base model: add \"base_model\" to {path / SETTINGS_FILE}")
    return base, settings.get("base_seed", 0)


def model_type_of(name: str) -> str | None:
    """config.json's `model_type` of a directory, an adapter's base, or a hub id (the cached file first).

    Raises:
        CaptuneError: missing directory or config.json, unreadable config, or a hub id that is neither cached nor
            reachable.
    """
    path = Path(name).expanduser()
    if path.exists():
        if (path / ADAPTER_CONFIG).is_file():
            base, _ = base_of_adapter(path)
            return model_type_of(base) if base not in PRESETS else _preset_type(base)
        config = path / "config.json"
        if not config.is_file():
            raise CaptuneError(
                f"model directory {path} has no config.json: pass a directory written by save_pretrained "
                "(e.g. RUN/best), a hub id, or --model tiny"
            )
        return _read_model_type(config)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CaptuneError(f"model directory {name} does not exist: check the path, or pass a hub id or --model tiny")
    return _read_model_type(_hub_config(name))


def _preset_type(preset: str) -> str:
    family = PRESETS[preset]
    return next(t for t, f in MODEL_TYPES.items() if f == family)


def _read_model_type(config: Path) -> str | None:
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise CaptuneError(f"{config} is not a readable model config ({exc}): rewrite it with save_pretrained") from exc


def _hub_config(name: str) -> Path:
    """config.json of a hub id: from the local cache, else downloaded (that file only) when the Hub is reachable."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(hf_hub_download(name, "config.json", local_files_only=True))
    except HFValidationError as exc:
        raise CaptuneError(f"model '{name}' is neither a directory nor a valid hub id: check the path") from exc
    except Exception:  # not cached (LocalEntryNotFoundError and kin)
        pass
    if not hub_reachable():
        raise CaptuneError(
            f"cannot load model '{name}': it is not in the local Hugging Face cache and the Hub is unreachable "
            "(no network, or HF_HUB_OFFLINE set); pass a local directory written by save_pretrained, or --model tiny"
        )
    try:
        return Path(hf_hub_download(name, "config.json"))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptuneError(f"cannot load model '{name}' (no such model id, or no access): {first}") from exc


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the Hub endpoint, so an offline machine fails in seconds rather than after retries."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_captune_settings(name: str) -> dict:
    """What captune recorded beside a saved model (prompt, generation options); empty for other models."""
    path = Path(name).expanduser() / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CaptuneError(f"{path} is unreadable ({exc}): delete it or rewrite it as JSON") from exc


def family_defaults(name: str) -> dict:
    """The config defaults of the family `name` belongs to: a preset's own, also for a directory captune trained
    from a preset (captune.json's base_model; a fine-tuned tiny model is still tiny), a LoRA adapter's base's."""
    if name in KNOWN_HUB_IDS:
        return family_module(KNOWN_HUB_IDS[name]).defaults(name)
    family = family_for(name)
    path = Path(name).expanduser()
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        name, _ = base_of_adapter(path)
    elif path.is_dir() and load_captune_settings(str(path)).get("base_model") in PRESETS:
        name = load_captune_settings(str(path))["base_model"]
    return family.defaults(name)


def build_batch(family, processor, images: list, captions: list[str], *, prompt: str, max_tokens: int) -> dict:
    """A whole training batch (one image per caption): `family.pixel_values` + `family.tokenize`."""
    batch = family.tokenize(processor, captions, prompt=prompt, max_tokens=max_tokens)
    batch["pixel_values"] = family.pixel_values(processor, images)
    return batch


# Processor class -> family: lets a bare processor (tests, benchmarks, notebooks) build batches without a model.
PROCESSOR_CLASSES = {
    "BlipProcessor": "blip",
    "Blip2Processor": "blip2",
    "GitProcessor": "git",
    "Florence2Processor": "florence2",
    "PaliGemmaProcessor": "paligemma",
    "Idefics3Processor": "smolvlm",
}


def family_of_processor(processor) -> types.ModuleType:
    """The family of a processor object (CaptionCollator's default when it is not told the family)."""
    name = type(processor).__name__
    if name not in PROCESSOR_CLASSES:
        raise CaptuneError(f"no captune family uses a {name}; supported processors: {', '.join(PROCESSOR_CLASSES)}")
    return family_module(PROCESSOR_CLASSES[name])


def all_sdpa_forward(module):
    """The SDPA forward some family has for `module` (an attention module), else None (`speed.enable_sdpa`)."""
    for family in sorted(set(MODEL_TYPES.values())):
        forward = family_module(family).sdpa_forward(module)
        if forward is not None:
            return forward
    return None


def caption_counter(name: str, prompt: str):
    """A function captions -> positions each takes of `data.max_caption_tokens` for the model `name` (a preset,
    a model or adapter directory, or a cached hub id), without loading weights (`captune check`).

    Raises:
        CaptuneError: an unsupported model, or a tokenizer that cannot be read offline.
    """
    family = family_for(name)
    if name in PRESETS:
        tokenizer = family.preset_tokenizer(name)
    else:
        path = Path(name).expanduser()
        if path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "tokenizer_config.json").is_file():
            return caption_counter(base_of_adapter(path)[0], prompt)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CaptuneError(f"cannot read the tokenizer of '{name}' offline ({first_line(exc)}): pass a model "
                               "directory or a preset to --model") from exc
    return lambda captions: family.caption_lengths(tokenizer, list(captions), prompt)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
