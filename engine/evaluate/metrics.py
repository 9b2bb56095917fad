"""Every metric ``eval.metrics`` can name: one function each, registered with ``@metric``.

Adding a metric is one decorated function in this file: its name is then valid in
``eval.metrics`` (the schema reads ``METRICS``), the evaluate stage computes it, and the
report knows which way is better and whether it belongs on the 0-1 bar plot. Families, by
what the function takes:

  pairwise  f(pred, ref) -> float in [0, 1], averaged over the pairs (exact_match, token_f1, rougeL)
  corpus    f(preds, refs) -> float, a statistic of the whole list (bleu)
  numeric   f(values: Values) -> float | None, on the numbers the texts state (mae, within_tol ...)
  model     f(run: ModelRun) -> (value, facts), needs the model or an embedder (cosine, perplexity)

Everything but the model family is a pure function (no model, no I/O); model metrics import
their machinery (embeddings.py, generation.py) only when called, so validation stays light.

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
from dataclasses import dataclass
from typing import Any, Literal, get_args

from engine.registry import did_you_mean

Family = Literal["pairwise", "corpus", "numeric", "model"]


@dataclass(frozen=True)
class Metric:
    name: str
    family: Family
    fn: Callable
    lower_is_better: bool
    """The report marks a decrease as the improvement (mae, perplexity)."""
    unit: bool
    """Always in [0, 1]: drawn on the report's base vs fine-tuned bar plot."""
    summary: str


METRICS: dict[str, Metric] = {}
"""Metric name -> its entry, in registration order (the order results are listed in)."""


def metric(name: str, family: Family, *, lower_is_better: bool = False, unit: bool = True) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the metric ``name`` (refuses a name taken twice).

    ``unit=False`` for metrics that leave [0, 1] (errors, R², perplexity); plugins may
    register their own (``plugins: [my_metrics]``) before the config is validated.
    """

    if family not in get_args(Family):
        raise ValueError(f"metric '{name}': unknown family '{family}'; valid: {', '.join(get_args(Family))}")

    def deco(fn: Callable) -> Callable:
        if name in METRICS:
            raise ValueError(f"metric '{name}' is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        METRICS[name] = Metric(name, family, fn, lower_is_better, unit, doc[0] if doc else "")
        return fn

    return deco


def unknown(names: list[str]) -> str | None:
    """Why some of ``names`` are not metrics, with the valid ones; None when all are."""
    bad = [n for n in names if n not in METRICS]
    if not bad:
        return None
    hints = "; ".join(f"unknown metric {n!r}{did_you_mean(str(n), list(METRICS))}" for n in bad)
    return f"{hints}; valid: {', '.join(METRICS)}"


def lower_is_better_names() -> frozenset[str]:
    """Result names where smaller is better, numeric ones with their expected-value twin (``mae_ev``)."""
    return _with_ev_twins(m for m in METRICS.values() if m.lower_is_better)


def unit_scale_names() -> frozenset[str]:
    """Result names always in [0, 1] (and their ``_ev`` twins): the ones the report plots as bars."""
    return _with_ev_twins(m for m in METRICS.values() if m.unit)


def _with_ev_twins(entries) -> frozenset[str]:
    out: set[str] = set()
    for m in entries:
        out |= {m.name, f"{m.name}_ev"} if m.family == "numeric" else {m.name}
    return frozenset(out)


# --- text -------------------------------------------------------------------------------------

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


@metric("exact_match", "pairwise")
def exact_match(pred: str, ref: str) -> float:
    """1.0 when the normalised texts are equal."""
    return float(normalize(pred) == normalize(ref))


@metric("token_f1", "pairwise")
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


@metric("rougeL", "pairwise")
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


@metric("bleu", "corpus")
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


@dataclass(frozen=True)
class Values:
    """The numbers the texts state: what a numeric metric scores.

    Only pairs whose reference states a number count (``pairs``); a prediction that states
    none is ``None`` there, so each metric decides how silence counts.
    """

    pairs: list[tuple[float | None, float]]
    tolerance: float

    @property
    def parsed(self) -> list[tuple[float, float]]:
        return [(p, r) for p, r in self.pairs if p is not None]

    @property
    def errors(self) -> list[float]:
        return [p - r for p, r in self.parsed]


def read_values(preds: list[str], refs: list[str], *, tolerance: float = 0.2, pattern: str | None = None) -> Values:
    stated = [(parse_number(p, pattern), parse_number(r, pattern)) for p, r in zip(preds, refs, strict=True)]
    return Values([(p, r) for p, r in stated if r is not None], tolerance)


@metric("parse_rate", "numeric")
def parse_rate(v: Values) -> float | None:
    """Share of the references' numbers that the prediction states a number for."""
    return len(v.parsed) / len(v.pairs) if v.pairs else None


@metric("within_tol", "numeric")
def within_tol(v: Values) -> float | None:
    """Share within ±tolerance; an unparsable prediction is a miss (saying nothing never looks better)."""
    return sum(abs(p - r) <= v.tolerance + 1e-12 for p, r in v.parsed) / len(v.pairs) if v.pairs else None


@metric("mae", "numeric", lower_is_better=True, unit=False)
def mae(v: Values) -> float | None:
    """Mean absolute error of the parsed pairs (None when none parsed)."""
    return sum(abs(e) for e in v.errors) / len(v.errors) if v.errors else None


@metric("rmse", "numeric", lower_is_better=True, unit=False)
def rmse(v: Values) -> float | None:
    """Root mean squared error of the parsed pairs (None when none parsed)."""
    return math.sqrt(sum(e * e for e in v.errors) / len(v.errors)) if v.errors else None


@metric("r2", "numeric", unit=False)
def r2(v: Values) -> float | None:
    """Coefficient of determination of the parsed pairs (None when none parsed or the references do not vary)."""
    if not v.errors:
        return None
    refs = [r for _, r in v.parsed]
    mean = sum(refs) / len(refs)
    ss_tot = sum((r - mean) ** 2 for r in refs)
    return 1 - sum(e * e for e in v.errors) / ss_tot if ss_tot > 0 else None


def numeric_scores(preds: list[str], refs: list[str], *, tolerance: float = 0.2, pattern: str | None = None) -> dict:
    """Every numeric metric at once, plus ``numeric_examples`` (pairs whose reference states a number)."""
    values = read_values(preds, refs, tolerance=tolerance, pattern=pattern)
    return {"numeric_examples": len(values.pairs), **{m.name: m.fn(values) for m in _family("numeric")}}


# --- model-based ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRun:
    """What a model-based metric may use besides the texts (plain values from the evaluate package)."""

    model: Any
    tokenizer: Any
    examples: list
    """The tokenized examples (their labels mark the reference answer's tokens)."""
    preds: list[str]
    refs: list[str]
    embedding: str
    """Back end of cosine: auto | minilm | tfidf."""
    batch_size: int
    device: Any
    autocast: Any = None


@metric("cosine", "model")
def cosine(run: ModelRun) -> tuple[float | None, dict]:
    """Mean cosine similarity of sentence embeddings (the back end is recorded: they are not comparable)."""
    from engine.evaluate.embeddings import cosine_scores

    sims, backend = cosine_scores(run.preds, run.refs, run.embedding)
    return (sum(sims) / len(sims) if sims else None), {"cosine_backend": backend}


@metric("perplexity", "model", lower_is_better=True, unit=False)
def perplexity(run: ModelRun) -> tuple[float | None, dict]:
    """exp(mean NLL) of the reference answers given their prompts, teacher-forced."""
    from engine.evaluate.generation import reference_perplexity

    ppl = reference_perplexity(
        run.model,
        run.examples,
        pad_id=run.tokenizer.pad_token_id,
        batch_size=run.batch_size,
        device=run.device,
        autocast=run.autocast,
    )
    return ppl, {}


@metric("pref_accuracy", "model")
def pref_accuracy(run: ModelRun) -> tuple[float | None, dict]:
    """Share of held-out preference pairs whose chosen answer the model finds likelier than the rejected one."""
    diffs = _preference_diffs(run)
    return (sum(d > 0 for d in diffs) / len(diffs) if diffs else None), {}


@metric("pref_margin", "model", unit=False)
def pref_margin(run: ModelRun) -> tuple[float | None, dict]:
    """Mean of log p(chosen) - log p(rejected) over held-out pairs (summed over each answer's tokens)."""
    diffs = _preference_diffs(run)
    return (sum(diffs) / len(diffs) if diffs else None), {}


_PREF_CACHE: list = []
"""(a weak reference to the ModelRun, its differences): pref_accuracy and pref_margin of one run
share one pass, and the cache never keeps a model alive."""


def _preference_diffs(run: ModelRun) -> list[float]:
    """log p(chosen | prompt) - log p(rejected | prompt) per pair, teacher-forced, summed over the answer tokens.

    Summed, not averaged: the sum is the probability of the whole answer, what a preference
    says one answer should have more of (and what DPO's implicit reward is built from).
    Examples that are not pairs are skipped (validation refuses these metrics without pairs).
    """
    if _PREF_CACHE and _PREF_CACHE[0]() is run:
        return _PREF_CACHE[1]
    import weakref
    from contextlib import nullcontext

    import torch

    from engine.data.collate import pair_collate
    from engine.loss import forward_loss
    from engine.loss.preference import sequence_logps

    def logps(hidden, labels, lm_head, batch):  # a "loss" that returns the per-row log-probs
        return sequence_logps(hidden, labels, lm_head)[0], {}

    pairs = [e for e in run.examples if getattr(e, "rejected", None) is not None]
    diffs: list[float] = []
    run.model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), run.batch_size):
            chunk = pairs[start : start + run.batch_size]
            batch = pair_collate(chunk, run.tokenizer.pad_token_id)
            batch = {k: v.to(run.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with run.autocast() if run.autocast else nullcontext():
                values, _ = forward_loss(run.model, batch, logps)
            n = len(chunk)
            diffs += (values[:n] - values[n:]).tolist()
    _PREF_CACHE[:] = [weakref.ref(run), diffs]
    return diffs


# --- scoring by name --------------------------------------------------------------------------


def score(names: list[str], preds: list[str], refs: list[str], *, tolerance: float = 0.2, pattern: str | None = None) -> dict:
    """The named text and numeric metrics, rounded (model-based ones are ``score_with_model``'s)."""
    chosen = [METRICS[n] for n in names if n in METRICS]
    out: dict = {}
    values = None
    for m in chosen:
        if m.family == "pairwise":
            out[m.name] = sum(m.fn(p, r) for p, r in zip(preds, refs, strict=True)) / max(1, len(preds))
        elif m.family == "corpus":
            out[m.name] = m.fn(preds, refs)
        elif m.family == "numeric":
            values = values or read_values(preds, refs, tolerance=tolerance, pattern=pattern)
            out[m.name] = m.fn(values)
    if values is not None:
        out["numeric_examples"] = len(values.pairs)
    return {k: _round(v) for k, v in out.items()}


def score_with_model(names: list[str], run: ModelRun) -> tuple[dict, dict]:
    """The named model-based metrics, rounded, and the facts they report (e.g. ``cosine_backend``)."""
    out: dict = {}
    facts: dict = {}
    for m in (METRICS[n] for n in names if n in METRICS and METRICS[n].family == "model"):
        value, more = m.fn(run)
        out[m.name] = _round(value)
        facts.update(more)
    return out, facts


def numeric_names(names: list[str]) -> list[str]:
    """Those of ``names`` that are numeric metrics."""
    return [n for n in names if n in METRICS and METRICS[n].family == "numeric"]


def _family(family: Family) -> list[Metric]:
    return [m for m in METRICS.values() if m.family == family]


def _round(v):
    return round(v, 4) if isinstance(v, float) else v
