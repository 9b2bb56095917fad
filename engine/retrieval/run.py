"""A run's retrieval: its index opened or built, and its passages put into each split's prompts.

The build_index stage calls the two steps in order, with plain arguments:

``open_index`` builds the index once, or reuses this run's (a resumed run), or ``eval.run_dir``'s,
when one was built from the same corpus the same way, or loads ``retrieval.index_path``; then
scores it on the labelled queries. Rank 0 writes ``retrieval/index.faiss`` and ``meta.json``.

``add_passages`` (when the data is prepared) puts each example's top-k passages into its prompt,
caches the contexts per split, and keeps the plain prompts for the evaluation's "without
retrieval" variants. With ``retrieval.in_training`` the returned bundle trains on the passages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.files import shown_path
from engine.model.names import display_name
from engine.retrieval import index as idx
from engine.retrieval.corpus import EXAMPLES, corpus_sha256, load_corpus
from engine.retrieval.embedders import Embedder, build_embedder
from engine.retrieval.metrics import read_queries, score
from engine.retrieval.prompts import augment, cache_key, contexts
from engine.retrieval.spec import IndexSpec

INDEX_DIR = "retrieval"


@dataclass
class RetrievalState:
    """What the later stages need: the loaded index, its metrics, and each split with and without passages."""

    retriever: idx.Retriever
    metrics: dict
    plain: dict[str, list] = field(default_factory=dict)
    """Each split's examples as the data group prepared them (the 'without retrieval' prompts)."""
    rag: dict[str, list] = field(default_factory=dict)
    """Each split's examples with their top-k passages in the prompt; empty when retrieval.k is 0."""


def needs_examples(spec: IndexSpec) -> bool:
    """The corpus is the training split itself: the data must be prepared before the index is built."""
    return spec.corpus == EXAMPLES and spec.index_path is None


def open_index(
    spec: IndexSpec,
    *,
    run_dir: Path,
    examples: list | None,
    earlier_run: Path | None = None,
    model: Callable[[], Any] | None = None,
    tokenizer: Callable[[], Any] | None = None,
    model_spec: Any = None,
    main: bool = True,
) -> RetrievalState:
    """The run's index: loaded from ``spec.index_path``, reused when one for the same corpus and settings
    is there, or built; scored on the labelled queries.

    Args:
        spec: the retrieval group's spec (an index kind, not none).
        run_dir: where the index is written (``run_dir/retrieval``) and whose paths metrics show relative to.
        examples: the prepared training split (the corpus ``examples``), or None when the data is not prepared.
        earlier_run: a finished run (``eval.run_dir``) whose index may be reused.
        model, tokenizer: load the run's model / tokenizer, called only when needed (the ``llm_mean_pool``
            embedder; a documents folder is cut in the tokenizer's tokens).
        model_spec: the run's model preset, named in the index's meta by ``llm_mean_pool``.
        main: rank 0 prints, shows progress and writes the files.
    """
    runtime = {}
    if spec.embedder == "llm_mean_pool":
        runtime = {"model": model(), "tokenizer": tokenizer(), "model_id": display_name(model_spec)}
    embedder = build_embedder(spec, **runtime)
    metrics: dict = {"kind": spec.kind, "embedder": spec.embedder}
    if spec.index_path is not None:
        where = Path(spec.index_path).expanduser()
        index, meta, how = idx.load(where, mmap=spec.mmap)
        idx.check_embedder(meta, embedder, shown_path(where, run_dir))
        metrics.update(source="index_path", index_path=shown_path(where, run_dir))
    else:
        folder = Path(spec.corpus).expanduser().is_dir()
        passages = load_corpus(
            spec.corpus,
            examples=examples,
            tokenizer=tokenizer() if folder and tokenizer is not None else None,
            chunk_tokens=spec.chunk_tokens,
            overlap=spec.overlap,
        )
        places = [run_dir / INDEX_DIR] + ([earlier_run / INDEX_DIR] if earlier_run is not None else [])
        sha = corpus_sha256(passages)  # once: what an earlier index is matched on, and what this one records
        found = _reusable(places, spec, embedder, sha)
        if found is not None:
            index, meta, how = idx.load(found, mmap=spec.mmap)
            metrics.update(source="reused", reused_from=shown_path(found, run_dir))
        else:
            index, seconds = idx.build(spec, embedder, passages, progress=main)
            label = spec.corpus if spec.corpus == EXAMPLES else shown_path(spec.corpus, run_dir)
            out_dir = run_dir / INDEX_DIR
            # Rank 0 writes the files; the other ranks hold the same meta in memory.
            if main:
                meta = idx.save(out_dir, index, spec, embedder, passages, label, sha)
            else:
                meta = idx.index_meta(spec, embedder, passages, label, sha)
            how = "memory"
            metrics.update(source="built", **seconds)
    if meta["embedder"].get("state"):
        embedder.load_state(meta["embedder"]["state"])
    idx.set_search_params(index, spec)
    retriever = idx.Retriever(index, meta, embedder, how=how)
    metrics.update(
        passages=meta["corpus"]["passages"],
        corpus=meta["corpus"]["source"],
        corpus_sha256=meta["corpus"]["sha256"],
        dim=meta["embedder"]["dim"],
        index_mb=round(meta.get("index_bytes", 0) / 1e6, 3),
        loaded=how,
    )
    if spec.queries:
        metrics["labelled_queries"] = _score_queries(retriever, spec)
        if main:
            shown = ", ".join(f"{k} {v}" for k, v in metrics["labelled_queries"].items() if k != "queries")
            print(f"[engine] retrieval on {metrics['labelled_queries']['queries']} labelled queries: {shown}", flush=True)
    return RetrievalState(retriever, metrics)


def add_passages(
    state: RetrievalState,
    spec: IndexSpec,
    data: Any,
    *,
    tokenizer: Any,
    max_length: int,
    train_on_prompt: bool,
    run_dir: Path,
    main: bool = True,
) -> tuple[Any, dict]:
    """Top-k passages into every split's prompts (cached per split); returns (the bundle to train on, metrics).

    ``data`` is the prepared ``DataBundle``; ``state.plain`` keeps its splits and ``state.rag`` gets them
    with passages. The bundle returned is ``data`` itself, or with ``spec.in_training`` a copy whose
    splits carry the passages.
    """
    state.plain = data.splits
    if spec.k == 0:
        return data, {"retrieval_k": 0}
    search = {k: getattr(spec, k) for k in idx.SEARCH_TIME if hasattr(spec, k)}
    key = cache_key(state.retriever.meta, search, spec.k)
    out_dir = run_dir / INDEX_DIR
    out_dir.mkdir(exist_ok=True)
    searched = shortened = 0
    for split, examples in data.splits.items():
        cache = out_dir / f"contexts-{split}-{key}.json" if main else None
        ids, n = contexts(state.retriever, examples, spec.k, cache=cache, key=key)
        state.rag[split], cut = augment(
            examples,
            ids,
            state.retriever,
            template=spec.template,
            source=data.template,
            tokenizer=tokenizer,
            max_length=max_length,
            train_on_prompt=train_on_prompt,
        )
        searched, shortened = searched + n, shortened + cut
    total = sum(len(v) for v in data.splits.values())
    train = state.rag.get("train") or []
    metrics = {
        "retrieval_k": spec.k,
        "retrieval_in_training": spec.in_training,
        "contexts_searched": searched,
        "contexts_cached": total - searched,
        "contexts_shortened": shortened,
        "rag_mean_train_length": round(sum(len(e.input_ids) for e in train) / max(1, len(train)), 1),
    }
    return (dataclasses.replace(data, splits=state.rag) if spec.in_training else data), metrics


def _score_queries(retriever: idx.Retriever, spec: IndexSpec) -> dict:
    labelled = read_queries(spec.queries, {p.id for p in retriever.passages})
    hits = retriever.search([q for q, _ in labelled], max(spec.metrics_k))
    rankings = [[retriever.passages[i].id for i, _ in row] for row in hits]
    return score(rankings, [rel for _, rel in labelled], spec.metrics_k)


def _reusable(places: list[Path], spec: IndexSpec, embedder: Embedder, sha256: str) -> Path | None:
    """The first of ``places`` holding an index built from the same corpus (``sha256``) the same way."""
    want = (spec.kind, idx.build_params(spec), embedder.name, embedder.model, sha256)
    for place in places:
        meta = idx.read_meta(place)
        if meta is None:
            continue
        e = meta["embedder"]
        have = (meta["kind"], meta["params"], e.get("name"), e.get("model"), meta["corpus"]["sha256"])
        if have == want:
            return place
    return None
