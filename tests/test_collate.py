"""The caption objective, point by point, as the original BLIP trains it."""

import pytest
import torch
from PIL import Image

from captune.data.collate import IGNORE_INDEX, CaptionCollator
from captune.models.blip import prompt_length


def _items(captions):
    return [{"image": Image.new("RGB", (80, 50), (200, 10, 10)), "caption": c} for c in captions]


def test_first_token_is_bos_as_generate_decodes(tiny):
    _, processor = tiny
    batch = CaptionCollator(processor)(_items(["two red circles", "one blue square"]))
    assert (batch["input_ids"][:, 0] == processor.tokenizer.bos_token_id).all()
    assert processor.tokenizer.bos_token_id == 30522
    # The caption itself follows unchanged and ends with [SEP].
    assert processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == "two red circles"
    assert batch["input_ids"][0, 4].item() == processor.tokenizer.sep_token_id


def test_padding_is_minus_100_and_dynamic(tiny):
    _, processor = tiny
    batch = CaptionCollator(processor, max_tokens=40)(_items(["a dog", "a very long caption about a dog in a park"]))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    # Padded to the longest caption in the batch, not to a fixed length.
    assert ids.shape[1] == int(mask.sum(1).max()) < 40
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert (ids[mask == 0] == processor.tokenizer.pad_token_id).all()
    # Real caption tokens are targets.
    assert (labels[0, 1:4] == ids[0, 1:4]).all()


@pytest.mark.parametrize("prompt", ["a picture of ", "a picture of"])
def test_prompt_is_masked_out_of_the_loss(tiny, prompt):
    _, processor = tiny
    collator = CaptionCollator(processor, prompt=prompt)
    batch = collator(_items(["two red circles"]))
    n = prompt_length(processor.tokenizer, prompt)
    assert n == 4  # [DEC] a picture of
    assert (batch["labels"][0, :n] == IGNORE_INDEX).all()
    assert processor.tokenizer.decode(batch["labels"][0, n:-1]) == "two red circles"
    assert processor.tokenizer.decode(batch["input_ids"][0, 1:n]) == "a picture of"


def test_captions_are_truncated_to_max_tokens(tiny):
    _, processor = tiny
    batch = CaptionCollator(processor, max_tokens=6)(_items(["one two three four five six seven eight"]))
    assert batch["input_ids"].shape[1] == 6
    assert batch["input_ids"][0, -1].item() == processor.tokenizer.sep_token_id  # still terminated


def test_pixel_values_match_the_processor_size(tiny):
    _, processor = tiny
    batch = CaptionCollator(processor)(_items(["x", "y"]))
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["pixel_values"].dtype == torch.float32


def test_loss_ignores_pads_and_smooths(tiny):
    from captune.train import caption_loss

    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[9, 1, 2, 3, IGNORE_INDEX], [9, 4, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    loss = caption_loss(logits, labels, 0.0)
    # By hand: positions t predict labels t+1; only non-ignored targets count.
    terms = [(0, 0, 1), (0, 1, 2), (0, 2, 3), (1, 0, 4)]
    expected = torch.stack([-torch.log_softmax(logits[b, t], -1)[y] for b, t, y in terms]).mean()
    assert torch.allclose(loss, expected)
    assert not torch.allclose(caption_loss(logits, labels, 0.1), expected)
    smoothed = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                                 ignore_index=IGNORE_INDEX, label_smoothing=0.1)
    assert torch.allclose(caption_loss(logits, labels, 0.1), smoothed)  # PyTorch's mean over kept targets


def test_a_batch_with_no_usable_pair_is_a_zero_loss_placeholder():
    """Every process must run each step (DDP all-reduces in backward), so an all-bad batch cannot just vanish."""
    from captune.model import load_model_and_processor
    from captune.train import caption_loss

    model, processor = load_model_and_processor("tiny")
    items = [{"skip": {"id": "a", "reason": "a.png: not a readable image"}}, {"pad": True}]
    batch = CaptionCollator(processor)(items)
    assert batch["pairs"] == 0 and batch["skipped"] == [items[0]["skip"]]
    assert batch["pixel_values"].shape == (1, 3, 64, 64) and (batch["labels"] == IGNORE_INDEX).all()
    model.train()
    logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"]).logits
    loss = caption_loss(logits, batch["labels"], 0.1)
    loss.backward()
    assert loss.item() == 0.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all((g == 0).all() for g in grads)  # it trains nothing
    # Padding among good items is dropped without a trace.
    mixed = CaptionCollator(processor)(_items(["x"]) + [{"pad": True}])
    assert mixed["pairs"] == 1 and mixed["input_ids"].shape[0] == 1 and "skipped" not in mixed
