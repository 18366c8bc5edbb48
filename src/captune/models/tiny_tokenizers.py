"""Small byte-level BPE tokenizers for the tiny presets of families whose real tokenizer cannot ship (OPT, T5,
Gemma...): trained in-process, offline, in well under a second, from a built-in corpus.

The corpus is the synthetic shapes task's words (what the tiny presets must learn to say, see data/synthetic.py)
plus a few hundred common English words, so everyday captions still split into a handful of tokens. Byte-level, so
any text encodes and decodes back exactly, whatever the corpus missed.

    tok = bpe_tokenizer(bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", extra_special=("<image>",))
"""

from __future__ import annotations

import functools

from transformers import PreTrainedTokenizerFast

from ..data.synthetic import COLOURS, COUNTS, SHAPES, caption_for

COMMON_WORDS = """
a an the of in on at to with and or for from by near over under above below behind front next beside between
is are was were be being has have had it its this that these those there here some many few several all each two
three four five six seven eight nine ten one man woman men women person people boy girl child children baby player
dog dogs cat cats horse horses cow cows sheep bird birds elephant elephants bear bears zebra zebras giraffe giraffes
car cars bus buses truck trucks train trains bike bicycle motorcycle plane airplane boat boats street road sidewalk
city building buildings house room kitchen bathroom bedroom living table tables chair chairs bed couch sofa desk
window door wall floor sign light traffic clock tower bench park field grass tree trees water beach ocean sea lake
river sky snow mountain hill food pizza sandwich plate bowl cup glass bottle cake banana bananas apple apples orange
oranges broccoli vegetables fruit meal plate toilet sink mirror shower laptop computer phone keyboard mouse screen
television tv book books umbrella kite kites ball frisbee skateboard surfboard skis racket bat glove bag suitcase
hat shirt jacket dress tie white black red blue green yellow brown gray grey orange pink purple dark large small
big little tall long short young old sitting standing walking running riding playing holding looking eating
flying lying laying parked driving wearing carrying watching waiting covered filled topped made down up out into
through around across along while during picture photo image view close top side corner middle background foreground
group couple pair line row bunch herd flock lot top bottom left right inside outside together empty full open
""".split()


def corpus() -> list[str]:
    """The training text: every shapes caption, the common words, and short phrases joining them."""
    lines = [caption_for(count, colour, shape) for count in range(1, len(COUNTS) + 1) for colour in COLOURS
             for shape in SHAPES]
    lines += COMMON_WORDS
    lines += [" ".join(COMMON_WORDS[i : i + 8]) for i in range(0, len(COMMON_WORDS), 8)]
    lines += [f"a picture of {line}" for line in lines[:36]]
    return lines


@functools.lru_cache(maxsize=None)
def _trained(vocab_size: int, specials: tuple[str, ...]) -> str:
    """The trained tokenizer as JSON (cached: each caller gets its own fresh object built from it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Repeated so that word counts dominate pair ties: the same merges come out on every run.
    tokenizer.train_from_iterator(corpus() * 4, trainer=trainer)
    return tokenizer.to_str()


def bpe_tokenizer(*, bos: str = "<s>", eos: str = "</s>", pad: str = "<pad>", unk: str = "<unk>",
                  extra_special: tuple[str, ...] = (), vocab_size: int = 1024, add_bos: bool = True,
                  add_eos: bool = False, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A small byte-level BPE as a transformers fast tokenizer, with the caller's special tokens.

    Special tokens get the first ids, in the order pad, bos, eos, unk, then `extra_special` (duplicates once), so
    e.g. pad is id 0 whatever the vocabulary size. Deterministic: the same arguments give the same ids in every call
    and process; trained once per process per argument set (~0.1 s).

    Args:
        bos, eos, pad, unk: the special tokens' strings (the same string may serve twice, as OPT's "</s>").
        extra_special: further special tokens never split nor merged, e.g. "<image>".
        vocab_size: total vocabulary size, specials and the 256 byte symbols included (a few hundred to ~2k).
        add_bos, add_eos: whether encoding with add_special_tokens=True puts bos first / eos last.
        model_max_length: the tokenizer's length limit.

    Returns:
        A PreTrainedTokenizerFast; save_pretrained / from_pretrained round-trip it.
    """
    from tokenizers import Tokenizer, processors

    specials = tuple(dict.fromkeys((pad, bos, eos, unk, *extra_special)))
    tokenizer = Tokenizer.from_str(_trained(vocab_size, specials))
    single = " ".join(([bos] if add_bos else []) + ["$A"] + ([eos] if add_eos else []))
    pair = " ".join(([bos] if add_bos else []) + ["$A", "$B"] + ([eos] if add_eos else []))
    used = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(used)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
        additional_special_tokens=[t for t in extra_special if t not in (bos, eos, pad, unk)],
        model_max_length=model_max_length,
    )
