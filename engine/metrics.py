"""Text metrics on (prediction, reference) pairs. Each returns a score in [0, 1]."""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    """Lowercase, NFKC, drop punctuation and articles, collapse whitespace (SQuAD-style)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (rouge-score, with stemming)."""
    import absl.logging
    from rouge_score import rouge_scorer

    absl.logging.set_verbosity(absl.logging.ERROR)

    if not pred.strip() and not ref.strip():
        return 1.0
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure


METRICS = {"exact_match": exact_match, "token_f1": token_f1, "rougeL": rouge_l}


def score(names: list[str], preds: list[str], refs: list[str]) -> dict[str, float]:
    n = max(1, len(preds))
    return {name: round(sum(METRICS[name](p, r) for p, r in zip(preds, refs, strict=True)) / n, 4) for name in names}
