"""SmolVLM / Idefics3's quirks: chat-template rows where only the assistant's reply and its end-of-turn token are
labels (role markers, image tokens and the instruction -100, checked token by token against the processor's own
rendering), generation from the template's generation prompt returning the reply alone, and a saved best/ captioning
the same with plain transformers as with captune."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from PIL import Image

from captune import models
from captune.captioner import Captioner
from captune.cli import main
from captune.data.synthetic import make_synthetic
from captune.errors import CaptuneError
from captune.generate import GenerationOptions, caption_images
from captune.model import load_model_and_processor
from captune.models.common import IGNORE_INDEX, mean_loss

# Every run here is in-process and no test reads a Java-only metric: scored without Java (see conftest's no_java).
pytestmark = pytest.mark.usefixtures("no_java")

PRESET = "tiny-smolvlm"


@pytest.fixture(scope="module")
def smol():
    return models.family_module("smolvlm")


@pytest.fixture(scope="module")
def tiny_smol():
    model, processor = load_model_and_processor(PRESET, seed=0)
    return model.eval(), processor


def _images():
    red = Image.new("RGB", (64, 64), (220, 30, 30))
    stripes = Image.new("RGB", (48, 64), (255, 255, 255))
    for x in range(0, 48, 8):
        stripes.paste((0, 0, 200), (x, 0, x + 4, 64))
    return red, stripes


def test_preset_is_the_real_class_with_one_tile_per_image(smol, tiny_smol):
    model, processor = tiny_smol
    assert type(model).__name__ == "Idefics3ForConditionalGeneration" and model.config.model_type == "idefics3"
    assert type(processor).__name__ == "Idefics3Processor" and processor.chat_template
    assert models.family_of(model) is smol and models.family_of_processor(processor) is smol
    assert models.family_defaults("HuggingFaceTB/SmolVLM-256M-Instruct")["eval.max_new_tokens"] >= 250  # long captions
    pixels = smol.pixel_values(processor, list(_images()))  # a non-square image still gives one square tile
    assert pixels.shape == (2, 3, 64, 64)
    features = model.get_image_features(pixels.unsqueeze(1)).pooler_output[0]
    assert features.shape[0] == processor.image_seq_len == smol.image_tokens(model) == 16
    full = smol.full_size_config()  # SmolVLM-256M: 512-px tiles, 16-px patches, pixel shuffle 4
    assert (full.vision_config.image_size // full.vision_config.patch_size) ** 2 // full.scale_factor ** 2 == 64


def test_labels_are_the_assistant_reply_alone_token_by_token(smol, tiny_smol):
    model, processor = tiny_smol
    tokenizer = processor.tokenizer
    captions = ["two red circles", "a dog"]
    batch = smol.tokenize(processor, captions, prompt="", max_tokens=40)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    # The rows are the processor's own rendering of the whole conversation (image expanded), minus the template's
    # trailing "\n" after the assistant's <end_of_utterance>.
    texts = [processor.apply_chat_template(smol.messages("", c)) for c in captions]
    assert texts[0].endswith("Assistant: two red circles<end_of_utterance>\n")
    reference = processor(images=[[image] for image in _images()], text=texts, return_tensors="pt",
                          padding="longest", padding_side="right")
    for row in range(2):
        length = int(mask[row].sum())
        assert torch.equal(ids[row, :length], reference["input_ids"][row, :length])
        assert tokenizer.decode(reference["input_ids"][row, length:length + 1]) == "\n"
    # Token by token: every position before the reply is -100 (role markers, image tokens, instruction, the
    # generation prompt), the reply and its <end_of_utterance> are labels, padding is -100.
    prompt = smol.prompt_ids(processor, "")
    n = len(prompt)
    head = tokenizer.convert_ids_to_tokens(ids[0, :n])
    assert head[0] == "<|im_start|>" and "<image>" in head and "<fake_token_around_image>" in head
    assert tokenizer.decode(ids[0, :n]).endswith("Describe this image in one sentence.<end_of_utterance>\nAssistant:")
    assert (labels[:, :n] == IGNORE_INDEX).all()
    for row, caption in enumerate(captions):
        reply = tokenizer(f" {caption}<end_of_utterance>", add_special_tokens=False)["input_ids"]
        assert labels[row, n:n + len(reply)].tolist() == reply == ids[row, n:n + len(reply)].tolist()
        assert (labels[row, n + len(reply):] == IGNORE_INDEX).all()
        assert labels[row, n + len(reply) - 1] == tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    assert (mask[1, -1] == 0) and (ids[1, -1] == tokenizer.pad_token_id)
    # The first decoding token: generate() continues exactly the training row's head, which is what the processor
    # builds for the generation prompt; both start with the start token.
    generation = smol.generation_inputs(processor, 2, "")
    assert torch.equal(generation["input_ids"], ids[:, :n])
    plain = processor(images=[[image] for image in _images()],
                      text=[processor.apply_chat_template(smol.messages(""), add_generation_prompt=True)] * 2,
                      return_tensors="pt")
    assert torch.equal(plain["input_ids"], generation["input_ids"])
    assert (ids[:, 0] == smol.start_token_id(processor)).all()
    # Another instruction, truncation keeping the end-of-turn, the empty placeholder caption, what `check` counts.
    other = smol.tokenize(processor, ["a dog"], prompt="Write a caption.", max_tokens=40)
    assert "User:" in tokenizer.decode(other["input_ids"][0]) and "Write a caption." in tokenizer.decode(
        other["input_ids"][0])
    cut = smol.tokenize(processor, ["one two three four five six seven"], prompt="", max_tokens=3)
    assert cut["input_ids"].shape[1] == n + 3 and cut["labels"][0, -1] == tokenizer.eos_token_id
    empty = smol.tokenize(processor, [""], prompt="", max_tokens=40)
    assert smol.target_tokens(empty) >= 1 and empty["labels"][0, -1] == tokenizer.eos_token_id
    counted = smol.caption_lengths(smol.preset_tokenizer(PRESET), captions, "")
    assert counted == [int((r != IGNORE_INDEX).sum()) for r in labels]


def test_loss_equals_the_models_own_and_depends_on_the_image(smol, tiny_smol):
    model, processor = tiny_smol
    red, stripes = _images()
    batch = smol.tokenize(processor, ["two red circles", "a dog"], prompt="", max_tokens=40)
    batch["pixel_values"] = smol.pixel_values(processor, [red, stripes])
    with torch.no_grad():
        ours = mean_loss(smol, model, batch)
        theirs = model(pixel_values=batch["pixel_values"].unsqueeze(1), input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        assert torch.allclose(ours, theirs, atol=1e-5)
        assert smol.sequence_nll(model, batch).sum() == pytest.approx(
            smol.loss_sum(model, batch, label_smoothing=0.0).item(), rel=1e-5)
        same = smol.tokenize(processor, ["two red circles"] * 2, prompt="", max_tokens=40)
        losses = [mean_loss(smol, model, {**same, "pixel_values": smol.pixel_values(processor, [image] * 2)})
                  for image in (red, stripes)]
    assert abs(losses[0].item() - losses[1].item()) > 1e-4  # the model sees the image


def test_generate_returns_the_reply_alone(smol, tiny_smol):
    model, processor = tiny_smol
    pixels = smol.pixel_values(processor, list(_images()))
    # Rig the LM head so the untrained model writes one word and then ends its turn: the reply is that word alone.
    word = processor.tokenizer.convert_tokens_to_ids("Ġred")
    end = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    calls = []

    def rig(module, args, output):
        bias = torch.zeros(output.shape[-1])
        bias[word if len(calls) < 2 else end] = 1e4
        calls.append(1)
        return output + bias

    hook = model.lm_head.register_forward_hook(rig)
    try:
        greedy = smol.generate(model, processor, pixels, GenerationOptions(max_new_tokens=6))
        calls.clear()
        beams = smol.generate(model, processor, pixels, GenerationOptions(max_new_tokens=6, num_beams=2,
                                                                          prompt="Write a caption."))
    finally:
        hook.remove()
    assert greedy == ["red red"] * 2 == beams  # no role marker, no instruction, no end-of-turn token


def test_modes_lora_and_speed_levers(smol):
    import re

    from captune.finetune import apply_mode
    from captune.speed import disable_sdpa, enable_sdpa, quantize_int8, share_images

    model, processor = load_model_and_processor(PRESET, seed=0, sdpa=False)
    smol.set_trainable(model, "frozen-vision")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("model.vision_model.") for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if "connector" in n)
    with pytest.raises(CaptuneError, match="frozen-lm"):
        smol.set_trainable(model, "frozen-lm")
    pattern = smol.lora_pattern(["q_proj", "down_proj"], vision=True)
    names = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    assert any("vision_model" in n and n.endswith("q_proj") for n in names)
    assert any(n.endswith("mlp.down_proj") for n in names)
    lora = apply_mode(load_model_and_processor(PRESET)[0], "lora", lora_targets=None)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "text_model" in n and "self_attn" in n for n in trainable)
    assert {n.split("self_attn.")[1].split(".")[0] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}

    model.eval()
    batch = smol.tokenize(processor, ["two red circles", "a dog"], prompt="", max_tokens=40)
    batch["pixel_values"] = smol.pixel_values(processor, list(_images()))
    options = GenerationOptions(num_beams=2, max_new_tokens=4)
    with torch.no_grad():
        eager_loss = mean_loss(smol, model, batch)
        eager = smol.generate(model, processor, batch["pixel_values"], options)
        assert enable_sdpa(model) == 4  # 2 Llama + 2 vision attentions
        assert torch.allclose(mean_loss(smol, model, batch), eager_loss, atol=1e-5)
        assert smol.generate(model, processor, batch["pixel_values"], options) == eager
        # Grouped caption sampling: one ViT pass per image, the same loss as the images repeated per caption.
        red, stripes = _images()
        three = smol.tokenize(processor, ["two red circles", "a dog", "a cat"], prompt="", max_tokens=40)
        repeated = mean_loss(smol, model, {**three, "pixel_values": smol.pixel_values(processor, [red, red, stripes])})
        with share_images(smol.vision_tower(model), torch.tensor([0, 0, 1])):
            grouped = mean_loss(smol, model, {**three, "pixel_values": batch["pixel_values"]})
        assert torch.allclose(grouped, repeated, atol=1e-5)
    disable_sdpa(model)
    quantize_int8(model)
    assert len(smol.generate(model, processor, batch["pixel_values"], options)) == 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("smolvlm_data"), n_train=16, n_val=4, seed=5)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A short tiny-smolvlm run through the CLI: 4 steps, best/ saved. Decoding forbids repeated tokens, so the
    briefly trained model writes words rather than one token over and over."""
    out = tmp_path_factory.mktemp("smolvlm") / "run"
    assert main(["-q", "train", "--model", PRESET, "--data", str(data), "--output", str(out), "--epochs", "2",
                 "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-2", "--num-workers", "0", "--report-to", "none",
                 "--set", "eval.max_new_tokens=6", "--set", "eval.min_new_tokens=3",
                 "--set", "eval.no_repeat_ngram_size=1"]) == 0
    return out


def test_saved_best_captions_the_same_with_plain_transformers_as_captune_caption(run, data, capsys):
    best = run / "best"
    images = sorted((data / "validation").glob("*.png"))[:2]
    capsys.readouterr()
    assert main(["-q", "caption", "--model", str(best), *map(str, images)]) == 0
    ours = capsys.readouterr().out.strip().splitlines()
    assert len(ours) == 2 and all(c and "Assistant" not in c and "Describe" not in c for c in ours)
    settings = json.loads((best / "captune.json").read_text())
    assert settings["base_model"] == PRESET and settings["generation"]["min_new_tokens"] == 3
    # The model card's plain-transformers snippet (chat template + generation prompt) prints the same caption.
    card = (best / "README.md").read_text(encoding="utf-8")
    assert "Idefics3ForConditionalGeneration" in card
    snippet = card.split("```python\n")[1].split("```")[0]
    snippet = snippet.replace('"path/to/this/directory"', repr(str(best))).replace('"photo.jpg"', repr(str(images[0])))
    assert "captune" not in snippet and "apply_chat_template" in snippet
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md", "exec"), {})
    assert printed.getvalue().strip() == ours[0]
    # Plain AutoModelForImageTextToText + AutoProcessor through captune's decoding, and Captioner, agree as well.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(best).eval()
    processor = AutoProcessor.from_pretrained(best)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration" and processor.chat_template
    pil = [Image.open(p).convert("RGB") for p in images]
    assert caption_images(model, processor, pil, GenerationOptions(**settings["generation"])) == ours
    assert Captioner.load(best, device="cpu").caption([str(p) for p in images]) == ours


def test_eval_report_and_export_work_on_a_smolvlm_run(run, data, tmp_path):
    from transformers import Idefics3ForConditionalGeneration

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"][-1] == 4  # 16 pairs / (4 x 2) a step, 2 epochs
    out = tmp_path / "eval"
    assert main(["-q", "eval", "--model", str(run / "best"), "--data", str(data), "--output", str(out),
                 "--max-new-tokens", "5"]) == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    assert "cider" in json.loads((out / "metrics.json").read_text())
    assert main(["-q", "report", str(run)]) == 0 and (run / "report.html").is_file()
    assert main(["-q", "export", str(run), "--output", str(tmp_path / "exported")]) == 0
    assert isinstance(Idefics3ForConditionalGeneration.from_pretrained(tmp_path / "exported"),
                      Idefics3ForConditionalGeneration)


def test_lora_run_resumes_exactly_and_reloads_merged(data, tmp_path, monkeypatch):
    from test_exact_resume import assert_resume_is_exact, train_only
    from transformers import Idefics3ForConditionalGeneration

    shards = train_only(tmp_path / "train", 12)
    assert_resume_is_exact(tmp_path, monkeypatch, shards, "--model", PRESET, "--mode", "lora", "--grad-accum", "2",
                           "--set", "train.lora_rank=4")
    adapted, processor = load_model_and_processor(str(tmp_path / "run" / "last"))
    assert isinstance(adapted, Idefics3ForConditionalGeneration)  # base rebuilt from captune.json, adapter merged
    base, _ = load_model_and_processor(PRESET, seed=42)
    layer = "model.text_model.layers.0.self_attn"
    assert not torch.equal(adapted.state_dict()[f"{layer}.q_proj.weight"], base.state_dict()[f"{layer}.q_proj.weight"])
    mlp = "model.text_model.layers.0.mlp.gate_proj.weight"  # not a default LoRA target: unchanged
    assert torch.equal(adapted.state_dict()[mlp], base.state_dict()[mlp])
    images = [Image.open(p).convert("RGB") for p in sorted((data / "validation").glob("*.png"))]
    assert len(caption_images(adapted.eval(), processor, images, GenerationOptions(max_new_tokens=3))) == len(images)


def test_a_processor_without_chat_template_or_with_the_wrong_image_seq_len_is_refused(smol, tiny_smol, tmp_path):
    model, processor = tiny_smol
    model.save_pretrained(tmp_path / "ok")
    processor.save_pretrained(tmp_path / "ok")
    reloaded, _ = load_model_and_processor(str(tmp_path / "ok"))
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    wrong = type(processor)(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                            image_seq_len=64, chat_template=smol.CHAT_TEMPLATE)
    with pytest.raises(CaptuneError, match="image_seq_len is 64 but the vision tower gives 16"):
        smol.check_processor("x", model, wrong)
    bare = type(processor)(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                           image_seq_len=16)
    with pytest.raises(CaptuneError, match="no chat template"):
        smol.check_processor("x", model, bare)


def test_tiny_preset_learns_the_shapes_under_its_defaults(tmp_path):
    """Direction, not a tuned threshold: under the preset's own defaults (lr, batch) a short run's loss falls by more
    than half and held-out exact match rises well above the untrained model's (the 0.99 of `captune demo` is in the
    README)."""
    from captune.config import load_config
    from captune.data import build_dataset
    from captune.evaluate import evaluate
    from captune.train import eval_options, train

    data = make_synthetic(tmp_path / "data", n_train=320, n_val=30, seed=7)
    cfg = load_config(None, {
        "output": str(tmp_path / "run"), "data": {"path": str(data), "num_workers": 0}, "model": {"name": PRESET},
        "train": {"epochs": 4, "log_every_steps": 5, "eval_every_epochs": 4},
        "eval": {"num_beams": 1, "max_new_tokens": 8, "min_new_tokens": 0, "batch_size": 30, "caption_before": False},
    })
    held_out = build_dataset(data).validation
    model, processor = load_model_and_processor(PRESET, seed=cfg.train.seed)
    before = evaluate(model, processor, held_out, eval_options(cfg), meteor=False)
    train(cfg, model=model, processor=processor)
    after = evaluate(*load_model_and_processor(str(tmp_path / "run" / "best")), held_out, eval_options(cfg),
                     meteor=False)
    losses = [r["loss"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if r["split"] == "train"]
    assert losses[-1] < 0.5 * losses[0]
    assert before.metrics["exact_match"] <= 0.05
    assert after.metrics["exact_match"] >= before.metrics["exact_match"] + 0.2, after.metrics


def test_check_counts_reply_tokens_against_the_long_caption_default(tmp_path, capsys):
    """`captune check` counts what `max_caption_tokens` limits for this family (the reply and its end-of-turn
    token): the 320-token default holds a 150-word description, 10 tokens would truncate it."""
    long = " ".join(["a man in a red shirt is riding a bike down the street next to a large white building"] * 8
                    + ["while two dogs are playing in the grass near a tree"] * 2)
    assert 140 <= len(long.split()) <= 200
    data = make_synthetic(tmp_path / "data", n_train=4, n_val=1)
    rows = (data / "train" / "metadata.jsonl").read_text().splitlines()
    rows[0] = json.dumps({"file_name": json.loads(rows[0])["file_name"], "text": long})
    (data / "train" / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    assert main(["check", str(data), "--model", PRESET, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["caption_tokens"]
    assert report["max_caption_tokens"] == 320 and report["truncated"] == 0
    assert report["max"] == len(models.family_module("smolvlm").preset_tokenizer(PRESET)(
        f" {long}<end_of_utterance>", add_special_tokens=False)["input_ids"]) > 100
    assert main(["check", str(data), "--model", PRESET, "--max-caption-tokens", "10"]) == 0
    assert "1 over max_caption_tokens=10 (tiny-smolvlm's tokens; training truncates them)" in capsys.readouterr().out
