"""Model loading: the tiny preset's BLIP layout, local directories, and offline errors."""

import pytest
from transformers import BlipForConditionalGeneration, BlipProcessor

from captune.errors import CaptuneError
from captune.model import load_model_and_processor
from captune.models.blip import blip_tokenizer, vocab_path


def test_shipped_vocabulary_is_bert_uncased():
    import hashlib

    assert hashlib.md5(vocab_path().read_bytes()).hexdigest() == "64800d5d8528ce344256daf115d4965e"


def test_tokenizer_has_blip_ids():
    tok = blip_tokenizer()
    assert len(tok) == 30524
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    assert (tok.bos_token_id, tok.pad_token_id, tok.sep_token_id, tok.cls_token_id) == (30522, 0, 102, 101)
    assert tok("A Red Circle")["input_ids"] == [101, 1037, 2417, 4418, 102]


def test_tiny_is_the_real_blip_class_with_sane_init(tiny):
    model, processor = tiny
    assert type(model) is BlipForConditionalGeneration
    assert model.config.vision_config.initializer_range == 0.02
    assert model.config.text_config.bos_token_id == 30522
    # Not the 1e-10 default: vision weights are spread out.
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.std() > 0.01
    assert processor.image_processor.size["height"] == model.config.vision_config.image_size


def test_tiny_init_is_seeded():
    a, _ = load_model_and_processor("tiny", seed=1)
    b, _ = load_model_and_processor("tiny", seed=1)
    c, _ = load_model_and_processor("tiny", seed=2)
    wa, wb, wc = (m.text_decoder.bert.embeddings.word_embeddings.weight for m in (a, b, c))
    assert (wa == wb).all() and not (wa == wc).all()


def test_local_directory_round_trip(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_model_and_processor(str(tmp_path))
    assert isinstance(loaded_processor, BlipProcessor)
    assert len(loaded_processor.tokenizer) == 30524
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert (p == q).all(), name


def test_errors_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CaptuneError, match="Hub is unreachable.*--model tiny"):
        load_model_and_processor("no-such-org/no-such-blip")
    with pytest.raises(CaptuneError, match="has no config.json"):
        load_model_and_processor(str(tmp_path))
    with pytest.raises(CaptuneError, match="does not exist"):
        load_model_and_processor(str(tmp_path / "missing"))
