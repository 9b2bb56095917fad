"""Metrics on (prediction, reference) pairs: pure functions, no model, no I/O.

Text metrics return a score in [0, 1] (higher is better). Corpus metrics take the whole
list at once: BLEU is a corpus statistic (sacrebleu), cosine needs an embedding model
(engine/evaluation/embeddings.py). Numeric metrics parse a value out of each text and
compare values; they are the ones to pick for answers like "Score: 0.42".

Conventions, the same everywhere (the tests pin them):
- two empty texts agree perfectly (1.0); one empty and one not score 0.0;
- text is NFKC-normalised, so "CO₂" and "CO2" are the same word;
- a number keeps its decimal point: "4.2" and "42" differ;
- digits inside a word are not a number: "CO2" and "PM2.5" state no value.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable

NUMBER = r"(?:(?<![\w.])[-+−])?(?<![\w.])(?:\d+(?:[.,]\d+)*|\.\d+)(?:[eE][-+]?\d+)?"
# Punctuation that is part of a number: a decimal point or thousands comma between
# digits, a minus sign before one. Protected from the punctuation strip.
_NUMBER_PUNCT = re.compile(r"(?<=\d)[.,](?=\d)|(?<!\w)[-−](?=\.?\d)")
_KEEP = {".": "\0", ",": "\1", "-": "\2", "−": "\2"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """SQuAD-style: NFKC, lowercase, drop punctuation (not inside numbers) and articles."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _NUMBER_PUNCT.sub(lambda m: _KEEP[m.group()], text)
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith(("P", "S")))
    text = text.replace("\0", ".").replace("\1", ",").replace("\2", "-")
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    """Harmonic mean of token precision and recall over normalised bags of words."""
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


class _UnicodeRougeTokenizer:
    """rouge-score's tokenizer keeps only [a-z0-9]: "αβγ" or "café" would vanish.

    This one keeps every Unicode word character and stems like rouge-score (Porter,
    words longer than 3 letters), so on ASCII text it gives rouge-score's own numbers.
    """

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stem = porter.PorterStemmer().stem

    def tokenize(self, text: str) -> list[str]:
        words = re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower().replace("_", " "))
        return [self._stem(w) if len(w) > 3 and w.isascii() else w for w in words]


_SCORER = None


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (rouge-score's LCS, Porter stemming, Unicode-aware tokens)."""
    global _SCORER
    if not pred.strip() and not ref.strip():
        return 1.0
    if _SCORER is None:
        import absl.logging
        from rouge_score import rouge_scorer

        absl.logging.set_verbosity(absl.logging.ERROR)
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeRougeTokenizer())
    return _SCORER.score(ref, pred)["rougeL"].fmeasure


def bleu(preds: list[str], refs: list[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokens, exp smoothing), scaled to [0, 1]."""
    import sacrebleu

    if not preds:
        return 0.0
    if all(not p.strip() and not r.strip() for p, r in zip(preds, refs, strict=True)):
        return 1.0
    return sacrebleu.corpus_bleu(list(preds), [list(refs)]).score / 100


# --- numbers ------------------------------------------------------------------------------


def parse_number(text: str, pattern: str | None = None) -> float | None:
    """The value an answer states: ``pattern``'s first group, else the last number in it.

    The last number, because answers tend to end with their value ("... so the score is
    -0.05") while the numbers before it restate the question. Thousands commas are
    dropped ("1,200" -> 1200); a Unicode minus counts as a minus.
    """
    text = unicodedata.normalize("NFKC", text)
    if pattern is not None:
        m = re.search(pattern, text)
        if not m:
            return None
        text = m.group(1) if m.groups() else m.group(0)
    found = re.findall(NUMBER, text)
    if not found:
        return None
    raw = found[-1] if pattern is None else found[0]
    try:
        return float(raw.replace("−", "-").replace(",", ""))
    except ValueError:
        return None


def numeric_scores(preds: list[str], refs: list[str], *, tolerance: float = 0.2, pattern: str | None = None) -> dict:
    """MAE, RMSE, R², within-tolerance accuracy and parse rate of stated values.

    Only pairs whose reference holds a number count. ``parse_rate`` is the share of those
    whose prediction holds one too; ``within_tol`` counts an unparsable prediction as a
    miss (so it never looks better by saying nothing); the error metrics use the parsed
    pairs only (``None`` when there are none; ``r2`` is ``None`` when the references do
    not vary).
    """
    pairs = [(parse_number(p, pattern), parse_number(r, pattern)) for p, r in zip(preds, refs, strict=True)]
    scored = [(p, r) for p, r in pairs if r is not None]
    parsed = [(p, r) for p, r in scored if p is not None]
    out: dict = {"numeric_examples": len(scored)}
    out["parse_rate"] = len(parsed) / len(scored) if scored else None
    out["within_tol"] = sum(abs(p - r) <= tolerance + 1e-12 for p, r in parsed) / len(scored) if scored else None
    if not parsed:
        return {**out, "mae": None, "rmse": None, "r2": None}
    errors = [p - r for p, r in parsed]
    out["mae"] = sum(abs(e) for e in errors) / len(errors)
    out["rmse"] = math.sqrt(sum(e * e for e in errors) / len(errors))
    mean = sum(r for _, r in parsed) / len(parsed)
    ss_tot = sum((r - mean) ** 2 for _, r in parsed)
    out["r2"] = 1 - sum(e * e for e in errors) / ss_tot if ss_tot > 0 else None
    return out


# --- the table the evaluate stage reads -------------------------------------------------

PAIRWISE: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "token_f1": token_f1, "rougeL": rouge_l}
CORPUS: dict[str, Callable[[list[str], list[str]], float]] = {"bleu": bleu}
NUMERIC = ("mae", "rmse", "r2", "within_tol", "parse_rate")
"""Computed together by ``numeric_scores``; pick any of them by name."""
MODEL_BASED = ("cosine", "perplexity")
"""Need a model: computed in engine/evaluation/, not here."""
ALL = (*PAIRWISE, *CORPUS, *MODEL_BASED, *NUMERIC)


def score(names: list[str], preds: list[str], refs: list[str], *, tolerance: float = 0.2, pattern: str | None = None) -> dict:
    """The named text and numeric metrics (model-based ones are skipped here), rounded."""
    out: dict = {}
    n = max(1, len(preds))
    for name in names:
        if name in PAIRWISE:
            out[name] = sum(PAIRWISE[name](p, r) for p, r in zip(preds, refs, strict=True)) / n
        elif name in CORPUS:
            out[name] = CORPUS[name](preds, refs)
    wanted = [n for n in names if n in NUMERIC]
    if wanted:
        num = numeric_scores(preds, refs, tolerance=tolerance, pattern=pattern)
        out.update({k: num[k] for k in wanted})
        out["numeric_examples"] = num["numeric_examples"]
    return {k: _round(v) for k, v in out.items()}


def _round(v):
    return round(v, 4) if isinstance(v, float) else v
