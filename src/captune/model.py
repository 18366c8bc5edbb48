"""Load a BLIP captioner and its processor: a hub id, a local directory, or the `tiny` preset."""

from __future__ import annotations

import json
import logging
import os
import socket
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipProcessor,
)

from .errors import CaptuneError
from .speed import enable_sdpa

log = logging.getLogger("captune")

TINY = "tiny"
DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"
TINY_IMAGE_SIZE = 64


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


def load_model_and_processor(
    name: str, *, seed: int = 0, sdpa: bool = True
) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """Load model and processor.

    Args:
        name: `tiny`, a local directory written by `save_pretrained` (a LoRA adapter directory too: its base model,
            named in captune.json, is loaded and the adapter merged in), or a Hugging Face hub id.
        seed: seeds the random initialisation of the `tiny` preset.
        sdpa: run attention through fused scaled-dot-product attention (`captune.speed.enable_sdpa`): same
            numbers, faster; False keeps transformers' eager attention (e.g. to read attention weights).

    Raises:
        CaptuneError: the directory is not a BLIP model, or the hub id cannot be fetched (offline or unknown).
    """
    model, processor = _load(name, seed)
    if sdpa:
        enable_sdpa(model)
    return model, processor


def _load(name: str, seed: int) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    if name == TINY:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = BlipForConditionalGeneration(tiny_config())
        processor = BlipProcessor(image_processor=image_processor(TINY_IMAGE_SIZE), tokenizer=blip_tokenizer())
        return model, processor
    path = Path(name).expanduser()
    if path.exists():
        if (path / "adapter_config.json").is_file():
            return _from_adapter(path)
        if not (path / "config.json").is_file():
            raise CaptuneError(
                f"model directory {path} has no config.json: pass a directory written by save_pretrained "
                "(e.g. RUN/best), a hub id, or --model tiny"
            )
        return _from_pickled_or_safe(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CaptuneError(f"model directory {name} does not exist: check the path, or pass a hub id or --model tiny")
    try:  # the cache first: no network round trips when the model was downloaded before
        return _from_pretrained(name, local_files_only=True)
    except CaptuneError:
        pass
    if not hub_reachable():
        raise CaptuneError(
            f"cannot load model '{name}': it is not in the local Hugging Face cache and the Hub is unreachable "
            "(no network, or HF_HUB_OFFLINE set); pass a local directory written by save_pretrained, or --model tiny"
        )
    return _from_pretrained(name, local_files_only=False)


def _from_pickled_or_safe(path: Path):
    """A local model directory; pickled weights (pytorch_model.bin) are named in a warning, and refused clearly
    when they hold anything but tensors.

    transformers prefers model.safetensors when both are present, and reads .bin files with torch's weights-only
    unpickler, so no code runs either way; what this adds is saying so, instead of loading silently or failing
    with a page of torch.load advice.
    """
    import pickle

    pickled = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickled and not any(path.glob("model*.safetensors")):
        log.warning("%s holds pickled weights (%s), not safetensors: loading them with PyTorch's weights-only "
                    "unpickler; `captune export %s --output DIR` writes a safetensors copy", path,
                    ", ".join(pickled), path)
    try:
        return _from_pretrained(str(path), local_files_only=True)
    except pickle.UnpicklingError as exc:
        raise CaptuneError(
            f"{path}: {', '.join(pickled) or 'the weights file'} holds Python objects besides tensors, which captune "
            "refuses to unpickle (that can run arbitrary code); use a model directory with model.safetensors, or "
            "convert this one on a machine where you trust its origin"
        ) from exc


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the Hub endpoint, so an offline machine fails in seconds rather than after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_pretrained(name: str, local_files_only: bool):
    try:
        model = BlipForConditionalGeneration.from_pretrained(name, local_files_only=local_files_only)
        processor = BlipProcessor.from_pretrained(name, local_files_only=local_files_only)
    except OSError as exc:
        where = "" if local_files_only else (
            " (no network access to the Hugging Face Hub, or no such model id; "
            "pass a local directory written by save_pretrained, or --model tiny)"
        )
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptuneError(f"cannot load model '{name}'{where}: {first_line}") from exc
    if not isinstance(processor, BlipProcessor):
        raise CaptuneError(f"'{name}' does not carry a BLIP processor; captune fine-tunes BlipForConditionalGeneration")
    return model, processor


SETTINGS_FILE = "captune.json"


def _from_adapter(path: Path):
    """A LoRA run's best/ or last/: rebuild the base model named in captune.json, put the adapter on, merge."""
    from .finetune import load_adapter

    settings = load_captune_settings(str(path))
    base = settings.get("base_model")
    if not base:
        try:
            base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError):
            base = None
    if not base:
        raise CaptuneError(f"LoRA adapter {path} does not name its base model: add \"base_model\" to {path / SETTINGS_FILE}")
    model, _ = load_model_and_processor(base, seed=settings.get("base_seed", 0))
    try:
        processor = BlipProcessor.from_pretrained(str(path), local_files_only=True)
    except OSError:  # an adapter saved without its processor: the base's is the same
        _, processor = load_model_and_processor(base, seed=settings.get("base_seed", 0))
    return load_adapter(model, str(path), merge=True), processor


def load_captune_settings(name: str) -> dict:
    """What captune recorded beside a saved model (prompt, generation options); empty for other models."""
    path = Path(name).expanduser() / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CaptuneError(f"{path} is unreadable ({exc}): delete it or rewrite it as JSON") from exc


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
