"""SDPA attention gives the eager model's numbers: logits, gradients and generated captions."""

import copy

import pytest
import torch
from PIL import Image
from transformers import BlipConfig
from transformers.models.blip.modeling_blip import BlipEncoderLayer
from transformers.models.blip.modeling_blip_text import BlipTextLayer

from captune.data.collate import CaptionCollator
from captune.generate import GenerationOptions, caption_images
from captune.model import load_model_and_processor
from captune.speed import apply_speed_levers, disable_sdpa, enable_sdpa, sdpa_enabled
from captune.train import caption_loss


@pytest.fixture(scope="module")
def tiny():
    model, processor = load_model_and_processor("tiny", seed=3)
    return model, processor


def _images(n, size=64):
    generator = torch.Generator().manual_seed(0)
    return [
        Image.fromarray(torch.randint(0, 256, (size, size + 7 * i, 3), generator=generator, dtype=torch.uint8).numpy())
        for i in range(n)
    ]


def _batch(processor):
    collator = CaptionCollator(processor, max_tokens=16)
    captions = ["a red square on a table", "two dogs", "a very long caption about a cat sitting on a mat"]
    return collator([{"image": image, "caption": c} for image, c in zip(_images(3), captions)])


def test_enable_counts_every_attention_module_and_disable_restores(tiny):
    model = copy.deepcopy(tiny[0])
    vision = model.config.vision_config.num_hidden_layers
    text = model.config.text_config.num_hidden_layers
    assert enable_sdpa(model) == vision + 2 * text  # ViT self-attention; decoder self- and cross-attention
    assert sdpa_enabled(model)
    assert enable_sdpa(model) == vision + 2 * text  # idempotent
    assert disable_sdpa(model) == vision + 2 * text
    assert not sdpa_enabled(model)
    assert all("forward" not in vars(m) for m in model.modules())


def test_train_mode_logits_loss_and_gradients_match_eager(tiny):
    """Train mode (dropout forced off) with padded captions: the causal + padding mask must reach SDPA."""
    model, processor = tiny
    batch = _batch(processor)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding to test the mask"
    results = []
    for sdpa in (False, True):
        candidate = copy.deepcopy(model)
        for module in candidate.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if sdpa:
            enable_sdpa(candidate)
        candidate.train()
        out = candidate(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"])
        loss = caption_loss(out.logits, batch["labels"], 0.1)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in candidate.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), loss.item(), grads))
    (eager_logits, eager_loss, eager_grads), (sdpa_logits, sdpa_loss, sdpa_grads) = results
    torch.testing.assert_close(sdpa_logits, eager_logits, atol=1e-4, rtol=1e-4)
    assert abs(sdpa_loss - eager_loss) < 1e-5
    assert eager_grads.keys() == sdpa_grads.keys()
    for name in ("vision_model.encoder.layers.0.self_attn.qkv.weight",
                 "text_decoder.bert.encoder.layer.0.crossattention.self.key.weight",
                 "text_decoder.bert.encoder.layer.1.attention.self.query.weight"):
        torch.testing.assert_close(sdpa_grads[name], eager_grads[name], atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generated_captions_identical_to_eager(tiny, num_beams):
    """Generation uses the EncoderDecoderCache (self-attention grows, cross-attention is computed once)."""
    model, processor = tiny
    model.eval()
    images = _images(4)
    options = GenerationOptions(num_beams=num_beams, max_new_tokens=12, min_new_tokens=3)
    eager = caption_images(model, processor, images, options, batch_size=4)
    candidate = copy.deepcopy(model)
    enable_sdpa(candidate)
    sdpa = caption_images(candidate, processor, images, options, batch_size=4)
    assert sdpa == eager
    # And with a prompt, which goes through the cache with a multi-token first step.
    prompted = GenerationOptions(num_beams=num_beams, max_new_tokens=8, prompt="a picture of")
    assert caption_images(candidate, processor, images, prompted) == caption_images(model, processor, images, prompted)


def test_full_size_layers_match_eager():
    """One BLIP-base-sized ViT layer (577 tokens, 768 wide) and one decoder layer: SDPA equals eager."""
    config = BlipConfig()
    vision = config.vision_config
    assert (vision.hidden_size, vision.image_size, vision.patch_size) == (768, 384, 16)
    torch.manual_seed(0)
    layer = BlipEncoderLayer(vision).eval()
    tokens = torch.randn(2, (384 // 16) ** 2 + 1, 768)
    with torch.no_grad():
        eager = layer(tokens)
        enable_sdpa(layer)
        fused = layer(tokens)
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)

    text_config = config.text_config
    text_config.is_decoder = True
    decoder = BlipTextLayer(text_config, 0).eval()
    hidden = torch.randn(2, 9, 768)
    causal = torch.full((9, 9), torch.finfo(torch.float32).min).triu(1)[None, None].expand(2, 1, 9, 9).clone()
    causal[1, :, :, 6:] = torch.finfo(torch.float32).min  # padding in the second caption
    with torch.no_grad():
        eager = decoder(hidden, encoder_hidden_states=tokens, attention_mask=causal)
        enable_sdpa(decoder)
        fused = decoder(hidden, encoder_hidden_states=tokens, attention_mask=causal)
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)


def test_apply_speed_levers_keeps_state_dict_keys(tiny):
    model = copy.deepcopy(tiny[0])
    keys = list(model.state_dict())
    apply_speed_levers(model, sdpa=True, compile=False)
    assert sdpa_enabled(model)
    assert list(model.state_dict()) == keys


def test_loader_enables_sdpa_by_default_and_opts_out():
    assert sdpa_enabled(load_model_and_processor("tiny")[0])
    assert not sdpa_enabled(load_model_and_processor("tiny", sdpa=False)[0])


def test_train_config_flags_reach_the_model(tmp_path):
    """train.sdpa=false restores eager attention on the model train() was given; fused AdamW trains a step."""
    from captune.config import load_config
    from captune.data.synthetic import make_synthetic
    from captune.train import train

    data = make_synthetic(tmp_path / "data", n_train=4, n_val=0)
    model, processor = load_model_and_processor("tiny")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = load_config(overrides=[f"data.path={data / 'train'}", f"output={tmp_path / 'run'}", "train.max_steps=1",
                                 "train.batch_size=2", "data.num_workers=0", "train.sdpa=false",
                                 "train.fused_adamw=true", "train.warmup_ratio=0"])
    train(cfg, model=model, processor=processor)
    assert not sdpa_enabled(model)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("sdpa", [False, True])
def test_beam_search_cache_gives_the_default_caches_tokens(tiny, sdpa):
    """Not reordering the cross-attention keys is exact: all beams of an image hold the same ones."""
    from captune.models.blip_sdpa import beam_search_cache

    model, processor = tiny
    candidate = copy.deepcopy(model).eval()
    (enable_sdpa if sdpa else disable_sdpa)(candidate)
    pixels = processor.image_processor(_images(4), return_tensors="pt")["pixel_values"]
    prompt = processor.tokenizer(["a picture of"] * 4, return_tensors="pt")["input_ids"]
    for beams, ids in ((3, None), (4, prompt)):
        kwargs = dict(num_beams=beams, max_new_tokens=10, min_new_tokens=4)
        plain = candidate.generate(pixel_values=pixels, input_ids=None if ids is None else ids.clone(), **kwargs)
        cache = beam_search_cache()
        moved = []
        cache.cross_attention_cache.reorder_cache = moved.append  # it must never be asked to move
        shared = candidate.generate(pixel_values=pixels, input_ids=None if ids is None else ids.clone(),
                                    cache=cache, **kwargs)
        assert torch.equal(plain, shared) and moved == []
        assert cache.cross_attention_cache.get_seq_length() == 65  # it was used: 64 patches + CLS per image


def test_compile_flag_reaches_the_config():
    from captune.cli import build_parser, train_overrides
    from captune.config import load_config

    parse = build_parser().parse_args
    assert load_config(None, train_overrides(parse(["train", "--compile"]))).train.compile is True
    assert load_config(None, train_overrides(parse(["train"]))).train.compile is False


def test_compile_uses_dynamic_shapes(monkeypatch):
    """Static compilation would recompile for every caption length dynamic padding produces."""
    model, _ = load_model_and_processor("tiny")
    calls = []
    monkeypatch.setattr(model, "compile", lambda **kwargs: calls.append(kwargs))
    apply_speed_levers(model, sdpa=True, compile=True)
    assert calls == [{"dynamic": True}]


def _autograd_names(tensor: torch.Tensor) -> list[str]:
    names, seen, stack = [], set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_sdpa_kernel_runs_in_forward_backward_and_generate(tiny, monkeypatch):
    """Kills "SDPA lever installs the eager forward" (tools/mutants.py): the SDPA-equals-eager tests above hold
    trivially when the fused kernel never runs, so count its calls (forward, generate) and its backward nodes."""
    model, processor = tiny
    vision, text = model.config.vision_config.num_hidden_layers, model.config.text_config.num_hidden_layers
    attention_modules = vision + 2 * text  # ViT self-attention; decoder self- and cross-attention
    candidate = copy.deepcopy(model)
    enable_sdpa(candidate)
    candidate.train()
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    batch = _batch(processor)
    out = candidate(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"])
    assert len(calls) == attention_modules
    loss = caption_loss(out.logits, batch["labels"], 0.1)
    backward_nodes = [name for name in _autograd_names(loss) if "ScaledDotProduct" in name]
    assert len(backward_nodes) == attention_modules, backward_nodes
    loss.backward()
    calls.clear()
    candidate.eval()
    new_tokens = 4
    caption_images(candidate, processor, _images(2), GenerationOptions(num_beams=1, max_new_tokens=new_tokens,
                                                                       min_new_tokens=new_tokens))
    assert len(calls) >= vision + 2 * text * new_tokens  # the ViT once, then every decoding step
