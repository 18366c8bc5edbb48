"""The offline byte-level BPE that tiny presets of non-BERT families build their tokenizer from."""

from __future__ import annotations

import subprocess
import sys

from captune.data.synthetic import COLOURS, SHAPES, caption_for
from captune.models.tiny_tokenizers import bpe_tokenizer

CAPTIONS = [caption_for(2, "red", "circle"), caption_for(1, "blue", "square"), "a picture of a dog on a bench",
            "Zebras, 3 of them: grazing!", "ünïcödé café ☕"]


def test_round_trips_any_caption_and_keeps_shape_words_whole():
    tok = bpe_tokenizer(extra_special=("<image>",))
    for caption in CAPTIONS:
        ids = tok(caption)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == caption
    # The shapes task's words are single tokens (a tiny preset learns them in minutes).
    for word in [*COLOURS, *SHAPES, "circles", "two"]:
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    assert 256 < len(tok) <= 2048


def test_special_tokens_come_first_and_are_never_split():
    tok = bpe_tokenizer(bos="</s>", eos="</s>", pad="<pad>", unk="<unk>", extra_special=("<image>",), add_eos=True)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 1)  # OPT's layout: bos is eos
    assert tok.unk_token_id == 2 and tok.convert_tokens_to_ids("<image>") == 3
    ids = tok("<image><image>two red circles")["input_ids"]
    assert ids[:3] == [1, 3, 3] and ids[-1] == 1
    batch = tok(["a", "two red circles"], padding="longest")
    assert batch["input_ids"][0][-1] == 0 and batch["attention_mask"][0][-1] == 0


def test_ids_are_stable_across_calls_and_processes(tmp_path):
    first, second = bpe_tokenizer(), bpe_tokenizer()
    assert first is not second  # each caller gets its own object to add tokens to
    assert first.get_vocab() == second.get_vocab()
    code = ("from captune.models.tiny_tokenizers import bpe_tokenizer; "
            "print(bpe_tokenizer()('two red circles and a dog')['input_ids'])")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == str(first("two red circles and a dog")["input_ids"])
    first.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("two red circles")["input_ids"] == first("two red circles")["input_ids"]
