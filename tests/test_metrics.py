"""Tests for captune.metrics: pycocoevalcap parity (with Java), the pure-Python fallback, and edge cases."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from captune import metrics
from captune.errors import CaptuneError
from captune.metrics import NO_JAVA_WARNING, normalize_caption, score, simple_tokenize

no_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime")

# Six images, 2-5 references each, with punctuation, clitics, hyphens, quotes and brackets that both
# tokenisers must treat alike. img1's prediction is a reference verbatim; img4's is empty.
REFS = {
    "img1": ["A dog runs across the grassy field.", "A brown dog is running on the grass.",
             "The dog's running through a park."],
    "img2": ["Two people riding bikes down a street.", "A couple of cyclists ride along the road!"],
    "img3": ["A black-and-white photo of a train at the station.",
             "An old train (a steam engine) waits by the platform.",
             "A train, parked at a station; people wait nearby.", "Steam train in black and white."],
    "img4": ["A plate of food with rice, beans & salad.", "Someone's lunch: rice and beans on a plate.",
             "A plate with rice and beans, it isn't fancy."],
    "img5": ["A cat sleeping on a red couch.", "The cat is asleep on the sofa.", "A grey cat naps on a couch...",
             'A "lazy" cat lying on a couch.', "Cat curled up on a red sofa, don't wake it."],
    "img6": ["A man holds an umbrella in the rain.", "Man with an umbrella walks in the rain - wet day."],
}
PREDS = {
    "img1": "A dog runs across the grassy field.",
    "img2": "two people ride bicycles on a road",
    "img3": "A train at a station.",
    "img4": "",
    "img5": "a cat on a couch.",
    "img6": "A woman holding a red umbrella?",
}
PERFECT = {k: refs[-1] for k, refs in REFS.items()}
# Harder sentences on which simple_tokenize was checked against PTBTokenizer (see test_simple_matches_ptb).
EXTRA_SENTENCES = [
    "Mr. Smith's dog can't swim -- it won't try.", "A U.S. flag, e.g. on a pole.", "They're gonna eat (maybe).",
    "A 3.5 inch disk costs $5.50 [50% off]... cannot be!", "\u201cSmart\u201d quotes \u2014 it\u2019s 10:30 a.m.",
    "The kids' toys, 1,000 of them; and/or x-rays: 'yes' `no`", "Plan A. Then we go!?",
]
KEYS = ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"]


def _flat(per_item):
    return {(image, key): value for image, scores in per_item.items() for key, value in scores.items()}


def _direct_pycocoevalcap(preds, refs):
    """What COCOEvalCap.evaluate() does minus SPICE, written out independently of captune."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({k: [{"caption": r} for r in v] for k, v in refs.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": preds[k]}] for k in refs})
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    meteor_scorer = Meteor()
    meteor = meteor_scorer.compute_score(gts, res)[0]
    del meteor_scorer
    cider, cider_items = Cider().compute_score(gts, res)
    out = {f"bleu_{n + 1}": bleu[n] for n in range(4)}
    out.update(meteor=meteor, rouge_l=Rouge().compute_score(gts, res)[0], cider=cider)
    out["per_item"] = {k: {"cider": c, "bleu_4": b} for k, c, b in zip(gts, cider_items, bleu_items[3])}
    return out


@pytest.fixture(scope="module")
def java_run():
    """One real score() with Java and one direct pycocoevalcap run, side by side: METEOR's JVM takes ~10 s
    to load its paraphrase table, so each is started once per module and the two overlap."""
    if shutil.which("java") is None:
        pytest.skip("needs a Java runtime")
    with ThreadPoolExecutor(1) as pool:
        direct = pool.submit(_direct_pycocoevalcap, PREDS, REFS)
        ours = score(PREDS, REFS, use_java=True, per_item=True)
        direct = direct.result()  # its Meteor is reaped by __del__; ours must be gone by now too
    try:
        import psutil
    except ImportError:  # not a captune dependency; only the leftover-process check needs it
        return ours, direct, None
    return ours, direct, [p.name() for p in psutil.Process().children(recursive=True)]


@pytest.mark.java
def test_java_matches_direct_pycocoevalcap(java_run):
    ours, direct, _ = java_run
    assert ours["tokenizer"] == "ptb"
    for key in KEYS:
        assert ours[key] == pytest.approx(direct[key], abs=1e-9), key
    assert _flat(ours["per_item"]) == pytest.approx(_flat(direct["per_item"]), abs=1e-9)
    assert ours["exact_match"] == pytest.approx(1 / 6)
    assert 0 < ours["meteor"] < 1


@pytest.mark.java
def test_java_run_leaves_no_java_process(java_run):
    _, _, children = java_run
    if children is None:
        pytest.skip("needs psutil")
    assert [name for name in children if "java" in name] == []


@pytest.mark.java
def test_fallback_scores_equal_ptb_scores_on_fixed_set(java_run):
    ours, _, _ = java_run
    fallback = score(PREDS, REFS, use_java=False, per_item=True)
    for key in ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "exact_match"]:
        assert fallback[key] == pytest.approx(ours[key], abs=1e-12), key
    assert _flat(fallback["per_item"]) == pytest.approx(_flat(ours["per_item"]), abs=1e-12)


@pytest.mark.java
@no_java
def test_simple_matches_ptb():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    sentences = sorted({s for refs in REFS.values() for s in refs} | set(PREDS.values()) | set(EXTRA_SENTENCES))
    ptb = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
    assert {s: simple_tokenize(s) for s in sentences} == {s: ptb[i][0] for i, s in enumerate(sentences)}


@pytest.mark.java
@no_java
def test_java_perfect_predictions(java_run, monkeypatch):
    # METEOR parity is covered by test_java_matches_direct_pycocoevalcap; skip a second ~10 s METEOR load here.
    monkeypatch.setattr(metrics, "_meteor_score", lambda gts, res: 1.0)
    ours, _, _ = java_run
    perfect = score(PERFECT, REFS, use_java=True)
    assert perfect["tokenizer"] == "ptb"
    assert perfect["exact_match"] == 1.0
    assert perfect["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["cider"] > ours["cider"]


@pytest.mark.java
@no_java
def test_line_breaks_cannot_shift_captions_between_images():
    # Java splits lines on \r, \f, \v, U+2028 too; PTBTokenizer would then hand img b the rest of img a.
    gts, res = metrics._ptb_tokenize({"a": "x\ry\x0bz", "b": "w"}, {"a": ["p\u2028q"], "b": ["r\x0cs"]}, ["a", "b"])
    assert res == {"a": ["x y z"], "b": ["w"]}
    assert gts == {"a": ["p q"], "b": ["r s"]}


@pytest.mark.java
def test_spice_left_out_when_its_jars_are_missing(java_run):
    ours, _, _ = java_run
    if (Path(metrics._spice_dir()) / "lib" / "stanford-corenlp-3.6.0.jar").is_file():
        pytest.skip("SPICE's CoreNLP jars are installed here")
    assert "spice" not in ours


# ---------------------------------------------------------------- fallback (no Java needed)

def test_fallback_hand_checked_values(caplog):
    # x: unigrams "a" matches, "dog" does not -> 1/2; y: all 3 match. Corpus BLEU-1 = (1+3)/(2+3) with
    # brevity penalty 1 (hypothesis and closest reference lengths are equal). ROUGE-L: x has LCS 1 of 2
    # words (P = R = 1/2 -> F = 1/2), y is 1.0 -> mean 0.75.
    with caplog.at_level(logging.WARNING, logger="captune"):
        out = score({"x": "a dog", "y": "The red car."}, {"x": ["a cat"], "y": ["the red car"]}, use_java=False)
    assert out["bleu_1"] == pytest.approx(0.8, abs=1e-8)
    assert out["rouge_l"] == pytest.approx(0.75)
    assert out["exact_match"] == 0.5
    assert out["meteor"] is None and "meteor" in out
    assert out["tokenizer"] == "simple"
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().endswith("METEOR skipped (install a "
                                                                                "Java runtime for the standard PTB tokenisation and METEOR)")


def test_fallback_exact_match_gives_bleu_1_of_one():
    out = score({"x": "A dog runs.", "y": "a cat"}, {"x": ["a dog runs"], "y": ["a cat", "x"]}, use_java=False)
    assert out["bleu_1"] == pytest.approx(1.0, abs=1e-8)
    assert out["exact_match"] == 1.0


def test_fallback_pinned_values_on_fixed_set():
    # Pinned from this implementation; equal to PTB + pycocoevalcap (test_fallback_scores_equal_ptb_...).
    out = score(PREDS, REFS, use_java=False)
    assert out["tokenizer"] == "simple" and out["meteor"] is None and "spice" not in out
    assert {k: out[k] for k in KEYS if k != "meteor"} == pytest.approx(PINNED, abs=1e-9)
    assert out["exact_match"] == pytest.approx(1 / 6)


PINNED = {"bleu_1": 0.5016712681850003, "bleu_2": 0.41972829654964666, "bleu_3": 0.3535427292166041,
          "bleu_4": 0.29319457221932066, "rouge_l": 0.5325693523530948, "cider": 1.4781635364921595}


def test_fallback_equals_pycocoevalcap_on_simple_tokens():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {k: [simple_tokenize(r) for r in v] for k, v in REFS.items()}
    res = {k: [simple_tokenize(PREDS[k])] for k in REFS}
    out = score(PREDS, REFS, use_java=False, per_item=True)
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_items = Cider().compute_score(gts, res)
    assert [out[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert out["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert out["cider"] == pytest.approx(cider, abs=1e-12)
    expected = {k: {"cider": c, "bleu_4": b} for k, c, b in zip(REFS, cider_items, bleu_items[3])}
    assert _flat(out["per_item"]) == pytest.approx(_flat(expected), abs=1e-12)


def test_perfect_predictions_fallback():
    perfect, varied = score(PERFECT, REFS, use_java=False), score(PREDS, REFS, use_java=False)
    assert perfect["exact_match"] == 1.0
    assert perfect["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["cider"] > varied["cider"]


def test_no_java_on_path_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="captune"):
        out = score(PREDS, REFS)
    assert out["tokenizer"] == "simple" and out["meteor"] is None
    assert [r.getMessage() for r in caplog.records] == [NO_JAVA_WARNING]
    with pytest.raises(CaptuneError, match="use_java=True"):
        score(PREDS, REFS, use_java=True)


def test_unwritable_ptb_dir_falls_back(monkeypatch, caplog):
    # The captions go to java through a temporary file: an unwritable temporary directory raises before java starts.
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "TemporaryDirectory", read_only)
    monkeypatch.setattr(metrics.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(metrics, "_meteor_score", lambda gts, res: 0.5)
    monkeypatch.setattr(metrics, "_spice_score", lambda gts, res: None)
    with caplog.at_level(logging.WARNING, logger="captune"):
        out = score(PREDS, REFS)
    assert len(caplog.records) == 1 and "PTB tokenizer failed" in caplog.records[0].getMessage()
    assert out["tokenizer"] == "simple" and out["meteor"] == 0.5
    assert out["cider"] == pytest.approx(PINNED["cider"], abs=1e-9)


# ---------------------------------------------------------------- simple_tokenize

@pytest.mark.parametrize("text, expected", [
    ("A Dog, running!", "a dog running"),
    ("The dog's ball", "the dog 's ball"),
    ("I don't know; they can't.", "i do n't know they ca n't"),
    ("we're here, I'm there, you'll see", "we 're here i 'm there you 'll see"),
    ("a man - walking -- fast ... ok?", "a man walking fast ok"),
    ('"quoted" and `ticks\' and \'single\'', "quoted and ticks and single"),
    ("black-and-white photo", "black-and-white photo"),
    ("a bowl (of soup)", "a bowl -lrb- of soup -rrb-"),
    ("the kids' toys", "the kids toys"),
    ("cannot", "can not"),
    ("", ""),
    ("...", ""),
])
def test_simple_tokenize(text, expected):
    assert simple_tokenize(text) == expected


def test_normalize_and_exact_match():
    assert normalize_caption("  A  Dog\tRuns.  ") == "a dog runs"
    assert normalize_caption("a dog runs . ") == "a dog runs"
    out = score({"a": " A DOG  runs. ", "b": "a cat!", "c": "a bird"},
                {"a": ["x", "a dog runs"], "b": ["a cat"], "c": ["a bird ."]}, use_java=False)
    assert out["exact_match"] == pytest.approx(2 / 3)  # "!" is not stripped


# ---------------------------------------------------------------- input checks, per item, CIDEr df

def test_mismatched_ids_raise():
    with pytest.raises(ValueError, match="img9") as err:
        score({**PREDS, "img9": "x"}, REFS, use_java=False)
    assert "without references" in str(err.value)
    with pytest.raises(ValueError, match="img1"):
        score({k: v for k, v in PREDS.items() if k != "img1"}, REFS, use_java=False)
    with pytest.raises(ValueError, match="non-empty"):
        score(PREDS, {**REFS, "img2": []}, use_java=False)
    with pytest.raises(ValueError):
        score({}, {}, use_java=False)


def test_empty_predictions_do_not_crash():
    out = score({k: "" for k in REFS}, REFS, use_java=False, per_item=True)
    assert out["bleu_4"] == pytest.approx(0.0, abs=1e-6) and out["cider"] == 0.0 and out["rouge_l"] == 0.0


def test_per_item_one_entry_per_id_and_mean_is_corpus_cider():
    out = score(PREDS, REFS, use_java=False, per_item=True)
    assert list(out["per_item"]) == list(PREDS)
    mean = sum(v["cider"] for v in out["per_item"].values()) / len(PREDS)
    assert mean == pytest.approx(out["cider"], abs=1e-12)
    assert out["per_item"]["img1"]["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert out["per_item"]["img4"]["bleu_4"] == pytest.approx(0.0, abs=1e-6)
    assert "per_item" not in score(PREDS, REFS, use_java=False)


def test_cider_document_frequency_comes_from_evaluated_references():
    # Same number of images either way, so only the document frequencies differ: an extra image whose
    # references repeat img5's n-grams ("a cat ... on a couch") makes them less informative for img5.
    def img5_cider(extra_refs):
        refs = {**REFS, "extra": extra_refs}
        return score({**PREDS, "extra": "something"}, refs, use_java=False, per_item=True)["per_item"]["img5"]["cider"]

    related = img5_cider(["a cat on a couch", "a cat lying on a couch"])
    unrelated = img5_cider(["an airplane in the sky", "a jet flying high"])
    assert related < unrelated
    # With one image every n-gram is in every document: idf log(1/1) = 0, so CIDEr is 0 even when perfect.
    assert score({"a": "a dog"}, {"a": ["a dog"]}, use_java=False)["cider"] == 0.0


# ---------------------------------------------------------------- METEOR cleanup, SPICE guard

class _FakeMeteor:
    """Stands in for pycocoevalcap's Meteor: a real child process plus the lock its compute_score holds."""

    def __init__(self, fail):
        self.meteor_p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lock = threading.Lock()
        self.fail = fail
        _FakeMeteor.last = self

    def compute_score(self, gts, res):
        self.lock.acquire()  # pycocoevalcap never releases it when reading METEOR's output fails
        if self.fail:
            raise ValueError("could not convert string to float: ''")
        self.lock.release()
        return 0.25, [0.25]


@pytest.mark.parametrize("fail", [False, True])
def test_meteor_process_is_reaped(monkeypatch, fail):
    import pycocoevalcap.meteor.meteor as meteor_module

    monkeypatch.setattr(meteor_module, "Meteor", lambda: _FakeMeteor(fail))
    if fail:
        with pytest.raises(RuntimeError, match="METEOR"):
            metrics._meteor_score({"a": ["x"]}, {"a": ["x"]})
    else:
        assert metrics._meteor_score({"a": ["x"]}, {"a": ["x"]}) == 0.25
    fake = _FakeMeteor.last
    assert fake.meteor_p.returncode is not None  # killed and waited for: no zombie
    assert not fake.lock.locked()  # so pycocoevalcap's __del__ cannot deadlock


@pytest.fixture
def spice_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "_spice_dir", lambda: str(tmp_path))
    return tmp_path


def _install_fake_spice(monkeypatch, result):
    import pycocoevalcap.spice.spice as spice_module

    built = []

    class FakeSpice:
        def __init__(self):
            built.append(self)

        def compute_score(self, gts, res):
            if isinstance(result, Exception):
                raise result
            return result, []

    monkeypatch.setattr(spice_module, "Spice", FakeSpice)
    return built


def test_spice_absent_is_skipped_without_building_it(spice_dir, monkeypatch, caplog):
    built = _install_fake_spice(monkeypatch, 0.3)
    (spice_dir / "spice-1.0.jar").touch()  # the jar alone is not enough: Spice() would download CoreNLP
    with caplog.at_level(logging.WARNING, logger="captune"):
        assert metrics._spice_score({"a": ["x"]}, {"a": ["x"]}) is None
    assert built == [] and caplog.records == []


def test_spice_failure_is_one_warning(spice_dir, monkeypatch, caplog):
    for name in ["spice-1.0.jar", "lib/stanford-corenlp-3.6.0.jar", "lib/stanford-corenlp-3.6.0-models.jar"]:
        (spice_dir / name).parent.mkdir(exist_ok=True)
        (spice_dir / name).touch()
    _install_fake_spice(monkeypatch, subprocess.CalledProcessError(1, ["java", "-jar", "spice-1.0.jar"]))
    with caplog.at_level(logging.WARNING, logger="captune"):
        assert metrics._spice_score({"a": ["x"]}, {"a": ["x"]}) is None
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()
    _install_fake_spice(monkeypatch, 0.3)
    assert metrics._spice_score({"a": ["x"]}, {"a": ["x"]}) == 0.3
    # and score() reports it only when it ran
    monkeypatch.setattr(metrics.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(metrics, "_ptb_tokenize", lambda p, r, ids: ({i: r[i] for i in ids}, {i: [p[i]] for i in ids}))
    monkeypatch.setattr(metrics, "_meteor_score", lambda gts, res: 0.5)
    assert score({"a": "x", "b": "y"}, {"a": ["x"], "b": ["z"]})["spice"] == 0.3


@pytest.mark.java
@no_java
def test_ptb_tokenizer_is_quiet_and_equals_pycocoevalcaps(capfd):
    """Our PTBTokenizer call gives pycocoevalcap's tokens without Java's "PTBTokenizer tokenized N tokens" line on
    stderr at every validation; a failing Java is an error naming Java's own message."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from captune.metrics import _run_ptb_tokenizer

    captions = {i: [{"caption": s}] for i, s in enumerate(sorted(set(PREDS.values()) | set(EXTRA_SENTENCES)))}
    ours = _run_ptb_tokenizer(captions)
    assert "tokens per second" not in capfd.readouterr().err
    assert ours == PTBTokenizer().tokenize(captions)
    assert "PTBTokenizer tokenized" in capfd.readouterr().err  # what pycocoevalcap's own call prints


def test_a_failing_ptb_tokenizer_says_why(monkeypatch):
    import subprocess

    from captune.metrics import _run_ptb_tokenizer

    failed = subprocess.CompletedProcess([], 1, stdout=b"", stderr=b"Exception in thread\nError: no such class\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError, match="PTBTokenizer \\(java\\) failed: Error: no such class"):
        _run_ptb_tokenizer({1: [{"caption": "a dog"}]})
