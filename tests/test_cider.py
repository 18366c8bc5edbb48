"""The in-process CIDEr-D (the SCST reward) equals pycocoevalcap's Cider on the same words and corpus."""

from __future__ import annotations

import random

import pytest
from pycocoevalcap.cider.cider import Cider

from captune.cider import END, build_cider_d, caption_words, cider_d

VOCAB = "a an the dog cat man woman red blue two on in with of near riding holding sitting standing table".split()


def corpus(seed: int, images: int = 40) -> tuple[list[list[list[str]]], list[list[list[str]]]]:
    """Random references (1-5 per image, 1-14 words) and 3 candidates per image: one copied from a reference, one a
    reference with words dropped and repeated (clipping and length penalty at work), one random (often empty)."""
    rng = random.Random(seed)
    refs, cands = [], []
    for _ in range(images):
        image_refs = [[rng.choice(VOCAB) for _ in range(rng.randint(1, 14))] for _ in range(rng.randint(1, 5))]
        base = rng.choice(image_refs)
        mangled = [w for w in base if rng.random() > 0.3] + [rng.choice(base)] * rng.randint(0, 4)
        refs.append(image_refs)
        cands.append([list(base), mangled, [rng.choice(VOCAB) for _ in range(rng.randint(0, 6))]])
    return refs, cands


def pycocoevalcap_scores(refs, hyps) -> list[float]:
    """pycocoevalcap's per-image CIDEr-D; its document frequencies come from exactly these references."""
    gts = {i: [" ".join(r) for r in image_refs] for i, image_refs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    return [float(s) for s in Cider().compute_score(gts, res)[1]]


@pytest.mark.parametrize("end", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_pycocoevalcap_with_the_same_document_frequencies(seed, end):
    refs, cands = corpus(seed)
    if end:  # the reward's end word, appended to candidates and references alike, is one more word to both
        refs = [[r + [END] for r in image_refs] for image_refs in refs]
        cands = [[c + [END] for c in group] for group in cands]
    # The reward's document frequencies come from a corpus given up front; pycocoevalcap's from the references of
    # the images it scores. Both see the same corpus here, one candidate per image per call for pycocoevalcap.
    cider = build_cider_d(refs)
    ours = cider_d(cider, cands, refs)
    checked = 0
    for slot in range(3):
        expected = pycocoevalcap_scores(refs, [group[slot] for group in cands])
        for image, value in enumerate(expected):
            assert ours[image][slot] == pytest.approx(value, abs=1e-6)
            checked += value > 0
    assert checked > 40  # not a comparison of zeros


def test_document_frequencies_are_the_given_corpus_not_the_scored_images():
    refs, cands = corpus(3)
    full = build_cider_d(refs)
    alone = build_cider_d(refs[:1])
    # The same image and caption score differently against a 40-image corpus than against itself alone (log 1 = 0).
    assert cider_d(full, cands[:1], refs[:1])[0][0] > 0
    assert cider_d(alone, cands[:1], refs[:1])[0][0] == 0


def test_end_word_rewards_finishing_the_caption():
    refs = [[caption_words("a man riding a horse"), caption_words("a man rides a brown horse")]]
    others = [[caption_words(t)] for t in ("a cat on a mat", "two dogs playing", "a red bus")]
    cider = build_cider_d(refs + others)
    truncated, finished = cider_d(cider, [[caption_words("a man riding a"), caption_words("a man riding")]], refs)[0]
    plain = build_cider_d([[w[:-1] for w in r] for r in refs + others])
    bare = cider_d(plain, [[caption_words("a man riding a", end=False), caption_words("a man riding", end=False)]],
                   [[w[:-1] for w in refs[0]]])[0]
    # Without the end word the dangling "a" only adds matched n-grams; with it, "riding a <eos>" matches nothing
    # and "riding <eos>" nothing either, so the dangling article earns less than it did.
    assert bare[0] > bare[1]
    assert truncated - finished < bare[0] - bare[1]


def test_caption_words_tokenises_like_the_metrics():
    assert caption_words("A Dog's toy, on the GRASS.") == ["a", "dog", "'s", "toy", "on", "the", "grass", END]
    assert caption_words("", end=True) == [END] and caption_words("", end=False) == []


def test_mismatched_groups_and_empty_corpus_are_refused():
    with pytest.raises(ValueError, match="reference set"):
        build_cider_d([])
    with pytest.raises(ValueError, match="candidate groups"):
        cider_d(build_cider_d([[["a"]]]), [[["a"]], [["b"]]], [[["a"]]])
