"""CIDEr-D in-process, as the SCST reward: pycocoevalcap's numbers, with document frequencies fixed up front.

pycocoevalcap's `Cider` is CIDEr-D as coco-caption computes it (Vedantam et al. 2015): n-grams 1-4, tf-idf vectors,
each hypothesis n-gram weight clipped to the reference's, a Gaussian length penalty (sigma 6), the mean over n and over
references, times 10. It takes its document frequencies from the references of the set it scores. SCST needs them
from the *training* references, computed once, and needs thousands of scores per step without a Java or subprocess
hop, so this module re-implements the same arithmetic over word lists (tests/test_cider.py checks it against
pycocoevalcap to 1e-6 on a shared corpus). Two quirks of coco-caption are kept on purpose, because they are what
every published CIDEr-D number includes: the "length" in the length penalty counts *bigrams* (words - 1), and an
n-gram never seen in the document set gets the largest idf, log(documents).

For the reward, captions end with END: the end of a caption is then a word like any other, and "a man riding a" no
longer matches the references' n-grams as well as "a man riding a horse" does (the "bad endings" fix of
self-critical.pytorch; without it SCST learns captions that stop on "with a").
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from .metrics import simple_tokenize

END = "<eos>"
"""The end-of-caption word; `simple_tokenize` splits "<" off, so no tokenised caption can contain it."""

Words = Sequence[str]


@dataclass(frozen=True)
class CiderD:
    """Document frequencies of a reference corpus (a small state holder: built once, read by every reward call).

    Attributes:
        document_frequency: n-gram -> number of documents (images) whose references contain it.
        log_documents: log of the number of documents.
        n: longest n-gram.
        sigma: width of the Gaussian length penalty.
    """

    document_frequency: dict[tuple[str, ...], int]
    log_documents: float
    n: int = 4
    sigma: float = 6.0


def caption_words(text: str, end: bool = True) -> list[str]:
    """A caption as the words CIDEr-D compares: `simple_tokenize` (PTB-like, lowercased, punctuation out), plus END."""
    words = simple_tokenize(text).split()
    return words + [END] if end else words


def ngram_counts(words: Words, n: int = 4) -> Counter:
    """Counts of every 1..n-gram of `words` (pycocoevalcap's `precook`)."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        counts.update(tuple(words[i : i + k]) for i in range(len(words) - k + 1))
    return counts


def build_cider_d(reference_sets: Iterable[Sequence[Words]], n: int = 4, sigma: float = 6.0) -> CiderD:
    """Document frequencies from one reference set per image (e.g. every training image's captions, as word lists).

    Raises:
        ValueError: no reference set given.
    """
    frequency: Counter = Counter()
    documents = 0
    for references in reference_sets:
        documents += 1
        frequency.update({gram for words in references for gram in ngram_counts(words, n)})
    if not documents:
        raise ValueError("CIDEr-D needs at least one reference set for its document frequencies")
    return CiderD(dict(frequency), math.log(float(documents)), n, sigma)


def _vector(cider: CiderD, counts: Counter) -> tuple[list[dict], list[float], int]:
    """tf-idf vector per n, its norms, and the bigram count coco-caption uses as the length."""
    vector: list[dict] = [{} for _ in range(cider.n)]
    norms = [0.0] * cider.n
    length = 0
    df, log_documents = cider.document_frequency, cider.log_documents
    for gram, tf in counts.items():
        order = len(gram) - 1
        weight = float(tf) * (log_documents - math.log(max(1.0, df.get(gram, 0.0))))
        vector[order][gram] = weight
        norms[order] += weight * weight
        if order == 1:
            length += tf
    return vector, [math.sqrt(v) for v in norms], length


def _similarity(cider: CiderD, hyp, ref) -> float:
    """Sum over n of the clipped, length-penalised cosine of one hypothesis and one reference."""
    (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
    penalty = math.exp(-((len_h - len_r) ** 2) / (2 * cider.sigma**2))
    total = 0.0
    for order in range(cider.n):
        ref_order = vec_r[order]
        value = 0.0
        for gram, weight in vec_h[order].items():
            ref_weight = ref_order.get(gram)
            if ref_weight:  # absent (or idf 0): contributes min(w, 0) * 0
                value += min(weight, ref_weight) * ref_weight
        if norm_h[order] != 0 and norm_r[order] != 0:
            value /= norm_h[order] * norm_r[order]
        total += value * penalty
    return total


def cider_d(cider: CiderD, candidates: Sequence[Sequence[Words]], references: Sequence[Sequence[Words]]) -> list[list[float]]:
    """CIDEr-D of several candidates per image against that image's references.

    Args:
        cider: the document frequencies (`build_cider_d`).
        candidates: per image, its candidate captions as word lists (e.g. SCST's k samples).
        references: per image, its reference captions as word lists.

    Returns:
        Per image, one score per candidate, on pycocoevalcap's scale (a perfect match of a typical COCO caption
        scores several units, not 1).
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidate groups for {len(references)} reference sets")
    scores = []
    for group, refs in zip(candidates, references):
        # Each image's reference vectors are built once and shared by all its candidates.
        ref_vectors = [_vector(cider, ngram_counts(words, cider.n)) for words in refs]
        row = []
        for words in group:
            hyp = _vector(cider, ngram_counts(words, cider.n))
            total = sum(_similarity(cider, hyp, ref) for ref in ref_vectors)
            row.append(total / cider.n / len(ref_vectors) * 10.0)
        scores.append(row)
    return scores
