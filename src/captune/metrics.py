"""Caption metrics: COCO-caption scores via pycocoevalcap's own scorers, plus exact match.

With a Java runtime, captions go through pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, lowercased,
punctuation removed) and are scored with BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D, which matches
`COCOEvalCap` minus SPICE. `COCOEvalCap.evaluate()` itself is not used: it always builds SPICE, which
downloads CoreNLP and needs Java 8.

Without Java, BLEU/ROUGE-L/CIDEr are computed by the same pycocoevalcap scorers on `simple_tokenize`
output and METEOR is None. `simple_tokenize` reproduces PTB tokenisation for ordinary caption text, so the
numbers are then identical; they can differ on rarer input, where PTB:
  * keeps some abbreviations with their period ("mr.", "u.s.", "A." before a lowercase word) - only a
    short list and a case heuristic are imitated here;
  * splits a few words or clitics differently ("'tis" -> "'t is", "y'all" -> "y' all", "at&t" kept whole,
    ":)" -> ":-rrb-");
  * turns "---" into "--", normalises unicode quotes and dashes in its own way.
Brackets are kept as "-lrb-"/"-rrb-"/... tokens in both: PTB lowercases them, so pycocoevalcap's
uppercase "-LRB-" entries never match and they are not removed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

from .errors import CaptuneError

logger = logging.getLogger("captune")

NO_JAVA_WARNING = ("java not found: scoring BLEU/ROUGE-L/CIDEr with captune's simple tokeniser; METEOR skipped "
                   "(install a Java runtime for the standard PTB tokenisation and METEOR)")

# Java's line reader also splits on these, which would silently shift every later caption onto the wrong
# image id inside PTBTokenizer (it zips ids with output lines); pycocoevalcap itself only replaces "\n".
_LINE_BREAKS = re.compile(r"[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_UNICODE = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2018": "'", "\u2019": "'",
                          "\u2013": " -- ", "\u2014": " -- "})
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "wanna": ["wan", "na"], "gotta": ["got", "ta"]}
_TOKEN = re.compile(r"""
      \b(?:[^\W\d_]\.){2,}(?!\w)                             # initialisms keep their periods: u.s. e.g. p.m.
    | \b(?-i:[A-Z])\.(?!\w)(?!\s+(?-i:[A-Z]))                 # "A." is an initial unless a sentence follows
    | \b(?:mrs?|ms|dr|st|jr|sr|vs|etc|prof|mt|inc|corp|ltd)\.  # PTB abbreviations that keep their period
    | \bno\.(?=\s*\d)                                         # "no. 5"
    | '(?:s|re|ve|ll|d|m)\b | n't\b                           # clitic already detached: "people 's"
    | (?:@|\#(?=[^\W\d]))?\w+(?:(?:['./-]|(?<=\d)[,:](?=\d))\w+)*  # x-ray and/or o'clock 1,000 3:30
    | \.{2,} | -{2,} | [?!]+                                  # runs PTB keeps as one token
    | \S                                                      # any other symbol on its own
""", re.VERBOSE | re.IGNORECASE)
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)$")
# PTBTokenizer turns '"' into `` or '' (both removed) and any run of hyphens or dots into -- or ... (removed).
_DROP = frozenset(PUNCTUATIONS) | {'"'}
_DASHES_OR_DOTS = re.compile(r"-+|\.+")


def simple_tokenize(text: str) -> str:
    """Tokenise one caption the way pycocoevalcap's PTBTokenizer + punctuation filter would, without Java.

    Lowercases; splits off punctuation and PTB clitics ("dog's" -> "dog 's", "don't" -> "do n't",
    "cannot" -> "can not"); drops the tokens pycocoevalcap removes (PUNCTUATIONS in ptbtokenizer.py).

    Args:
        text: a raw caption.

    Returns:
        Space-joined tokens ("" when nothing is left).
    """
    text = text.translate(_UNICODE)
    tokens: list[str] = []
    # Lowercase after matching: PTB decides some periods by case ("A." initial vs "B. The" sentence end).
    for tok in map(str.lower, _TOKEN.findall(text)):
        if tok in _BRACKETS:
            tokens.append(_BRACKETS[tok])
        elif tok in _SPLIT_WORDS:
            tokens.extend(_SPLIT_WORDS[tok])
        elif tok in _DROP or _DASHES_OR_DOTS.fullmatch(tok):
            continue
        else:
            tokens.extend(t for t in _CLITIC.split(tok) if t)
    return " ".join(tokens)


def normalize_caption(text: str) -> str:
    """Normalise for exact match: lowercase, collapse whitespace, drop trailing periods.

    Args:
        text: a raw caption.

    Returns:
        The normalised caption.
    """
    return " ".join(text.lower().split()).rstrip(".").rstrip()


def score(predictions: dict[str, str], references: dict[str, list[str]], *, use_java: bool | None = None,
          per_item: bool = False, meteor: bool = True) -> dict:
    """Score captions against references with pycocoevalcap's scorers (see the module docstring).

    CIDEr is pycocoevalcap's CIDEr-D with document frequencies computed from the references being scored
    (as in COCO evaluation), so an image's CIDEr depends on the other images in the set; a one-image set
    always scores CIDEr 0 (log of one document).

    Args:
        predictions: image id -> predicted caption ("" is allowed).
        references: image id -> non-empty list of reference captions; same ids as `predictions`.
        use_java: True requires Java (PTB tokeniser and METEOR), False never uses it, None uses it when
            `java` is on PATH.
        per_item: also return per-image CIDEr and BLEU-4.
        meteor: False skips METEOR (value None): its Java process takes ~10 s to load its paraphrase table, too
            slow for every validation during training.

    Returns:
        bleu_1..bleu_4, meteor (None without Java), rouge_l, cider, exact_match as floats on pycocoevalcap's
        scale; spice only when SPICE's jars are already on disk and it ran; the `caption_guards` numbers
        (repeated_ngram_rate, distinct_captions, distinct_references, vocabulary); tokenizer: "ptb" or "simple";
        with per_item, per_item: {id: {"cider": float, "bleu_4": float}}.

    Raises:
        ValueError: ids differ, a reference list is empty, or a caption is not a string.
        CaptuneError: use_java=True but no `java` on PATH.
    """
    _check_inputs(predictions, references)
    ids = list(predictions)
    has_java = shutil.which("java") is not None
    if use_java and not has_java:
        raise CaptuneError("metrics: use_java=True but no `java` on PATH; install a Java runtime "
                           "or pass use_java=None to fall back to the simple tokeniser")
    use_java = has_java if use_java is None else use_java

    exact = sum(normalize_caption(predictions[i]) in {normalize_caption(r) for r in references[i]} for i in ids)
    tokenizer = "simple"
    if not use_java:
        logger.warning(NO_JAVA_WARNING if not has_java else NO_JAVA_WARNING.replace("java not found",
                                                                                     "use_java=False", 1))
    else:
        try:
            gts, res = _ptb_tokenize(predictions, references, ids)
            tokenizer = "ptb"
        except OSError as err:  # e.g. no writable temporary directory for the captions file java reads
            logger.warning("PTB tokenizer failed (%s): scoring with captune's simple tokeniser instead", err)
    if tokenizer == "simple":
        gts = {i: [simple_tokenize(r) for r in references[i]] for i in ids}
        res = {i: [simple_tokenize(predictions[i])] for i in ids}

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, cider_items = Cider().compute_score(gts, res)
    result = {f"bleu_{n + 1}": float(bleu[n]) for n in range(4)}
    result["meteor"] = _meteor_score(gts, res) if use_java and meteor else None
    result.update(rouge_l=float(rouge), cider=float(cider), exact_match=exact / len(ids))
    spice = _spice_score(gts, res) if use_java else None
    if spice is not None:
        result["spice"] = spice
    result.update(caption_guards(predictions, references))
    result["tokenizer"] = tokenizer
    if per_item:
        # Every scorer iterates gts.keys(), which is built in `ids` order, so list positions line up with ids.
        result["per_item"] = {i: {"cider": float(c), "bleu_4": float(b)}
                              for i, c, b in zip(ids, cider_items, bleu_items[3])}
    return result


# Thresholds of `guard_warnings`: a model that names fewer than half the distinct scenes its references describe
# has collapsed, and one caption in ten with a repeat is far above what human captions do (COCO's: well under 1%).
COLLAPSE_RATIO = 0.5
REPEAT_RATE = 0.1
GUARD_MIN_IMAGES = 4
"""Fewer images than this say too little about diversity to warn."""


def has_repeat(words: list[str]) -> bool:
    """A caption "repeats" when a word follows itself ("post post") or a word trigram occurs twice ("a hat on top
    of a hat on top"). Repeated bigrams alone are not counted: "on a ... on a" is ordinary English."""
    if any(a == b for a, b in zip(words, words[1:])):
        return True
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(set(trigrams)) < len(trigrams)


def caption_guards(predictions: dict[str, str], references: dict[str, list[str]] | None = None) -> dict:
    """Numbers that expose the two classic fine-tuning failures: repeated words and collapsed captions.

    Words are `simple_tokenize` tokens (lowercased, punctuation out), with or without Java.

    Args:
        predictions: image id -> predicted caption.
        references: image id -> reference captions (for distinct_references); optional.

    Returns:
        repeated_ngram_rate: share of captions with a repeat (see `has_repeat`);
        distinct_captions: distinct predicted captions / images;
        distinct_references: distinct reference sets / images, the most distinct_captions a model that tells every
            scene apart needs (1.0 on COCO; lower where images share captions, as in the synthetic shapes);
            only with `references`;
        vocabulary: distinct words over all predicted captions (an int).
    """
    words = [simple_tokenize(c).split() for c in predictions.values()]
    count = max(len(words), 1)
    out = {"repeated_ngram_rate": sum(map(has_repeat, words)) / count,
           "distinct_captions": len({" ".join(w) for w in words}) / count}
    if references is not None:
        sets = {frozenset(" ".join(simple_tokenize(r).split()) for r in references[i]) for i in predictions}
        out["distinct_references"] = len(sets) / count
    out["vocabulary"] = len({w for caption in words for w in caption})
    return out


def guard_warnings(metrics: dict, images: int | None = None) -> list[str]:
    """Plain-words warnings for collapsed or repeating captions, with their usual cause; [] when all looks normal.

    Args:
        metrics: a `score` result (or any dict with the `caption_guards` keys; missing keys are not judged).
        images: how many images the numbers come from (None: judge anyway).
    """
    if images is not None and images < GUARD_MIN_IMAGES:
        return []
    out = []
    distinct, ceiling = metrics.get("distinct_captions"), metrics.get("distinct_references")
    if isinstance(distinct, (int, float)) and distinct < COLLAPSE_RATIO * (ceiling if ceiling is not None else 1.0):
        out.append(
            f"captions have collapsed: only {distinct:.0%} of the images get a caption of their own (the references "
            f"tell {ceiling if ceiling is not None else 1.0:.0%} apart), so the model says much the same thing for "
            "every image. The usual cause is a learning rate too high for the data (or too many epochs on a small "
            "set): lower train.lr (e.g. by 10x) and compare with the captions from before fine-tuning. Early in "
            "training a model that has not yet learnt to tell the images apart does the same.")
    rate = metrics.get("repeated_ngram_rate")
    if isinstance(rate, (int, float)) and rate >= REPEAT_RATE:
        out.append(
            f"{rate:.0%} of the captions repeat words (\"post post\", \"a hat on top of a hat on top of\"). Usual "
            "causes: too little training (the model has not learnt to stop) or overfitting; decoding with "
            "no_repeat_ngram_size 3 or repetition_penalty 1.2-1.5 suppresses it (eval.no_repeat_ngram_size, "
            "--no-repeat-ngram-size).")
    return out


def _check_inputs(predictions: dict, references: dict) -> None:
    if predictions.keys() != references.keys():
        no_ref = [str(k) for k in predictions if k not in references][:5]
        no_pred = [str(k) for k in references if k not in predictions][:5]
        raise ValueError(f"predictions and references must have the same ids; without references: "
                         f"{no_ref or 'none'}, without a prediction: {no_pred or 'none'}")
    if not predictions:
        raise ValueError("nothing to score: predictions is empty")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{key!r}] must be a non-empty list of strings, got {refs!r}")
        if not isinstance(predictions[key], str):
            raise ValueError(f"predictions[{key!r}] must be a string, got {predictions[key]!r}")


def _ptb_tokenize(predictions: dict, references: dict, ids: list) -> tuple[dict, dict]:
    """Run PTBTokenizer once (one JVM start) over references and predictions together."""
    captions = {("ref", i): [{"caption": _LINE_BREAKS.sub(" ", r)} for r in references[i]] for i in ids}
    captions.update({("pred", i): [{"caption": _LINE_BREAKS.sub(" ", predictions[i])}] for i in ids})
    out = _run_ptb_tokenizer(captions)
    # PTBTokenizer zips ids with output lines, so a short output (java crashed) would silently drop images.
    if any(len(out.get(key, ())) != len(value) for key, value in captions.items()):
        raise RuntimeError("PTBTokenizer returned fewer lines than captions; is `java` working?")
    return {i: out[("ref", i)] for i in ids}, {i: out[("pred", i)] for i in ids}


def _run_ptb_tokenizer(captions: dict) -> dict:
    """pycocoevalcap's `PTBTokenizer.tokenize`, same command and output, with Java's stderr captured.

    Its own version lets Java print "PTBTokenizer tokenized N tokens at ... tokens per second" at every validation
    (noise that looks like news) and writes its temporary file inside the installed package. Here the input goes
    through a temporary directory, the chatter is dropped, and a failing Java's message becomes the error.
    """
    import os
    import subprocess
    import tempfile

    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    keys = [k for k, v in captions.items() for _ in range(len(v))]
    sentences = "\n".join(c["caption"].replace("\n", " ") for v in captions.values() for c in v)
    with tempfile.TemporaryDirectory(prefix="captune-ptb-") as folder:
        source = os.path.join(folder, "captions.txt")
        with open(source, "w", encoding="utf-8") as handle:
            handle.write(sentences)
        done = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", source], capture_output=True)
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"PTBTokenizer (java) failed: {detail[-1] if detail else f'exit {done.returncode}'}")
    out: dict = {}
    for key, line in zip(keys, done.stdout.decode().split("\n")):
        out.setdefault(key, []).append(" ".join(w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS))
    return out


def _meteor_score(gts: dict, res: dict) -> float:
    """METEOR 1.5 via pycocoevalcap, always shutting its Java subprocess down (also on errors).

    Empty hypotheses were checked with meteor-1.5.jar: they score 0.0 and neither hang nor crash, so
    they are passed through unchanged.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        return float(meteor.compute_score(gts, res)[0])
    except Exception as err:  # a dead JVM surfaces as "could not convert string to float: b''"
        raise RuntimeError(f"METEOR (java -jar meteor-1.5.jar, -Xmx2G) failed: {err!r}; "
                           "score with use_java=False to skip it") from err
    finally:
        _close_meteor(meteor)


def _close_meteor(meteor) -> None:
    if hasattr(meteor, "close"):
        meteor.close()
        return
    # pycocoevalcap 1.2 only cleans up in __del__, which first takes `lock`; compute_score leaves the lock
    # held if it raises, so __del__ would then block the garbage collector forever. Kill and reap here.
    proc = meteor.meteor_p
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    proc.kill()
    proc.wait()
    if meteor.lock.locked():
        meteor.lock.release()


def _spice_dir() -> str:
    # pycocoevalcap itself is a namespace package (its __file__ is None); spice/ has an __init__.py.
    import pycocoevalcap.spice

    return os.path.dirname(os.path.abspath(pycocoevalcap.spice.__file__))


def _spice_score(gts: dict, res: dict) -> float | None:
    """SPICE when its jar and both CoreNLP 3.6.0 jars are on disk (else Spice() downloads them), else None."""
    spice_dir = _spice_dir()
    needed = ["spice-1.0.jar", "lib/stanford-corenlp-3.6.0.jar", "lib/stanford-corenlp-3.6.0-models.jar"]
    if not all(os.path.isfile(os.path.join(spice_dir, name)) for name in needed):
        logger.debug("SPICE skipped: %s lacks %s", spice_dir, ", ".join(needed))
        return None
    try:
        from pycocoevalcap.spice.spice import Spice

        return float(Spice().compute_score(gts, res)[0])
    except Exception as err:  # SPICE needs Java 8 and writes a cache beside itself: many ways to fail
        logger.warning("SPICE failed, leaving it out: %s", " ".join(f"{type(err).__name__}: {err}".split()))
        return None


METRIC_ORDER = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice", "exact_match",
                "repeated_ngram_rate", "distinct_captions", "distinct_references", "vocabulary")


def format_metrics_table(columns: dict[str, dict]) -> str:
    """A plain-text table: one row per metric, one column per named metrics dict."""
    names = list(columns)
    widths = [max(10, len(n) + 2) for n in names]  # model paths as column names can be long
    keys = [k for k in METRIC_ORDER if any(k in c for c in columns.values())]
    first = max(map(len, keys), default=6) + 2
    lines = [f"{'metric':<{first}}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    for key in keys:
        lines.append(f"{key:<{first}}" + "".join(f"{format_value(columns[n].get(key)):>{w}}"
                                                 for n, w in zip(names, widths)))
    return "\n".join(lines)


def format_value(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # counts (vocabulary)
    return "n/a" if value is None else f"{value:.3f}"
