"""Retrieval glue shared by the stages: the run's index, and its passages in each split's prompts.

Why a module of its own: build_index, prepare_data and evaluate all need the same loaded index
(``ctx.retrieval``), and prepare_data must not import a stage that imports it back. Nothing here
is a stage; the work is engine/retrieval/.

``ensure_index`` builds the index once (or reuses this run's, a resumed run's or ``eval.run_dir``'s
when built from the same corpus the same way, or loads ``retrieval.index_path``) and scores it on
the labelled queries. ``with_retrieval`` (prepare_data, right after the data is prepared) puts each
example's top-k passages into its prompt, cached per split, and keeps the plain prompts for the
evaluation's "without retrieval" variants.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

INDEX_DIR = "retrieval"


@dataclass
class RetrievalState:
    """What the later stages need: the loaded index, its metrics, and each split with and without passages."""

    retriever: object
    metrics: dict
    plain: dict[str, list] = field(default_factory=dict)
    """Each split's examples as the data group prepared them (the 'without retrieval' prompts)."""
    rag: dict[str, list] = field(default_factory=dict)
    """Each split's examples with their top-k passages in the prompt; empty when retrieval.k is 0."""


def retrieval_on(cfg) -> bool:
    return cfg.retrieval is not None and cfg.retrieval.kind != "none"


def needs_data(spec) -> bool:
    """The index is built over the training split: the data must be prepared first."""
    return spec.corpus == "examples" and spec.index_path is None


def ensure_index(ctx) -> RetrievalState:
    """The run's index: built once (or reused when one for the same corpus and settings is there)."""
    if ctx.retrieval is not None:
        return ctx.retrieval
    spec = ctx.cfg.retrieval
    if needs_data(spec) and ctx.data is None:
        raise RuntimeError("ensure_index: corpus 'examples' needs ctx.data; call ensure_data first")
    from engine.files import shown_path
    from engine.retrieval import index as idx
    from engine.retrieval.corpus import load_corpus
    from engine.retrieval.embedders import build_embedder

    runtime = {}
    if spec.embedder == "llm_mean_pool":
        runtime = {
            "model": ctx.accelerator.unwrap_model(ctx.model()),
            "tokenizer": ctx.tokenizer(),
            "model_id": _model_id(ctx.cfg.model),
        }
    embedder = build_embedder(spec, **runtime)
    out_dir = ctx.run_dir / INDEX_DIR
    metrics: dict = {"kind": spec.kind, "embedder": spec.embedder}
    if spec.index_path is not None:
        where = Path(spec.index_path).expanduser()
        index, meta, how = idx.load(where, mmap=spec.mmap)
        idx.check_embedder(meta, embedder, shown_path(where, ctx.run_dir))
        metrics.update(source="index_path", index_path=shown_path(where, ctx.run_dir))
    else:
        passages = load_corpus(
            spec.corpus,
            examples=ctx.data.splits["train"] if ctx.data is not None else None,
            tokenizer=ctx.tokenizer() if Path(spec.corpus).expanduser().is_dir() else None,
            chunk_tokens=spec.chunk_tokens,
            overlap=spec.overlap,
        )
        found = _reusable(ctx, spec, embedder, passages)
        if found is not None:
            index, meta, how = idx.load(found, mmap=spec.mmap)
            metrics.update(source="reused", reused_from=shown_path(found, ctx.run_dir))
        else:
            index, seconds = idx.build(spec, embedder, passages, progress=ctx.is_main)
            label = spec.corpus if spec.corpus == "examples" else shown_path(spec.corpus, ctx.run_dir)
            meta = (
                idx.save(out_dir, index, spec, embedder, passages, label) if ctx.is_main else _unsaved(spec, embedder, passages)
            )
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
        if ctx.is_main:
            shown = ", ".join(f"{k} {v}" for k, v in metrics["labelled_queries"].items() if k != "queries")
            print(f"[engine] retrieval on {metrics['labelled_queries']['queries']} labelled queries: {shown}", flush=True)
    ctx.retrieval = RetrievalState(retriever, metrics)
    ctx.record("build_index", metrics)
    return ctx.retrieval


def with_retrieval(ctx) -> dict:
    """Top-k passages into every split's prompts (prepare_data calls this); returns its metrics."""
    from engine.retrieval.index import SEARCH_TIME
    from engine.retrieval.prompts import augment, cache_key, contexts

    spec, data = ctx.cfg.retrieval, ctx.data
    state = ensure_index(ctx)
    state.plain = data.splits
    if spec.k == 0:
        return {"retrieval_k": 0}
    search = {k: getattr(spec, k) for k in SEARCH_TIME if hasattr(spec, k)}
    key = cache_key(state.retriever.meta, search, spec.k)
    out_dir = ctx.run_dir / INDEX_DIR
    out_dir.mkdir(exist_ok=True)
    searched = shortened = 0
    for split, examples in data.splits.items():
        cache = out_dir / f"contexts-{split}-{key}.json" if ctx.is_main else None
        ids, n = contexts(state.retriever, examples, spec.k, cache=cache, key=key)
        state.rag[split], cut = augment(
            examples,
            ids,
            state.retriever,
            template=spec.template,
            source=data.template,
            tokenizer=ctx.tokenizer(),
            max_length=ctx.cfg.data.max_length,
            train_on_prompt=ctx.cfg.data.train_on_prompt,
        )
        searched, shortened = searched + n, shortened + cut
    if spec.in_training:
        ctx.data = dataclasses.replace(data, splits=state.rag)
    total = sum(len(v) for v in data.splits.values())
    train = state.rag.get("train") or []
    return {
        "retrieval_k": spec.k,
        "retrieval_in_training": spec.in_training,
        "contexts_searched": searched,
        "contexts_cached": total - searched,
        "contexts_shortened": shortened,
        "rag_mean_train_length": round(sum(len(e.input_ids) for e in train) / max(1, len(train)), 1),
    }


def _score_queries(retriever, spec) -> dict:
    from engine.retrieval.metrics import read_queries, score

    labelled = read_queries(spec.queries, {p.id for p in retriever.passages})
    hits = retriever.search([q for q, _ in labelled], max(spec.metrics_k))
    rankings = [[retriever.passages[i].id for i, _ in row] for row in hits]
    return score(rankings, [rel for _, rel in labelled], spec.metrics_k)


def _reusable(ctx, spec, embedder, passages) -> Path | None:
    """This run's index (a resumed run) or the evaluated run's, when built from the same corpus the same way."""
    from engine.retrieval.corpus import corpus_sha256
    from engine.retrieval.index import build_params, read_meta

    want = (spec.kind, build_params(spec), embedder.name, embedder.model, corpus_sha256(passages))
    places = [ctx.run_dir / INDEX_DIR]
    if ctx.cfg.evaluated_run is not None:
        places.append(ctx.cfg.evaluated_run.path / INDEX_DIR)
    for place in places:
        meta = read_meta(place)
        if meta is None:
            continue
        e = meta["embedder"]
        have = (meta["kind"], meta["params"], e.get("name"), e.get("model"), meta["corpus"]["sha256"])
        if have == want:
            return place
    return None


def _unsaved(spec, embedder, passages) -> dict:
    """The meta a non-main rank would have saved (rank 0 writes the files)."""
    from engine.retrieval.corpus import corpus_sha256
    from engine.retrieval.index import FORMAT, build_params

    return {
        "format": FORMAT,
        "kind": spec.kind,
        "params": build_params(spec),
        "embedder": {**embedder.identity, "state": embedder.state()},
        "corpus": {"source": spec.corpus, "sha256": corpus_sha256(passages), "passages": len(passages)},
        "passages": [p.row() for p in passages],
    }


def _model_id(model) -> str:
    """Which weights llm_mean_pool's vectors come from (saved with the index; no local path)."""
    if getattr(model, "package", None):
        return f"{model.package}/{model.file}"
    if getattr(model, "name_or_path", None):
        p = Path(model.name_or_path).expanduser()
        return p.name if p.is_absolute() else model.name_or_path
    return model.kind
