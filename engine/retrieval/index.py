"""FAISS indexes: one registered builder per kind, a streamed build, save/load, search with exclusions.

Build: the embedder sees the corpus in batches of ``batch_size`` texts; each batch's vectors go
straight into the index, so besides the index only one batch of vectors is ever held (``ivf_pq``
first embeds its training sample, trains, drops it, then streams everything). A tqdm bar counts
passages.

Save: ``index.faiss`` (faiss.write_index) and ``meta.json`` next to it: format, kind and its
build parameters, the embedder's identity (name, model, dimension, plus the tfidf vocabulary),
the corpus (where from, sha256, count) and every passage (id, text, source). meta.json is
written last, so a directory with one is complete.

Load: ``faiss.read_index(path, faiss.IO_FLAG_MMAP)`` where the kind allows (pages are read on
demand and shared between processes), else an ordinary read; which one happened is recorded.
An index whose embedder identity differs from the run's is refused with both named.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import UserError
from engine.files import write_json_atomic
from engine.retrieval.corpus import Passage, corpus_sha256
from engine.retrieval.spec import RETRIEVAL, FlatIpSpec, FlatL2Spec, HnswSpec, IndexSpec, IvfPqSpec, NoRetrievalSpec

FORMAT = 1
INDEX_FILE, META_FILE = "index.faiss", "meta.json"
SEARCH_TIME = frozenset({"ef_search", "nprobe"})
"""Parameters that only steer search: changing them does not need a rebuild."""


@RETRIEVAL.register("none", NoRetrievalSpec)
def none(spec, **_):
    """Retrieval off: no index, plain prompts."""
    return None


@RETRIEVAL.register("flat_ip", FlatIpSpec)
def flat_ip(spec, *, dim: int, n: int):
    """Exact inner product on normalised vectors (cosine); every query scans every vector."""
    import faiss

    return faiss.IndexFlatIP(dim)


@RETRIEVAL.register("flat_l2", FlatL2Spec)
def flat_l2(spec, *, dim: int, n: int):
    """Exact Euclidean distance (on unit vectors it ranks as flat_ip does)."""
    import faiss

    return faiss.IndexFlatL2(dim)


@RETRIEVAL.register("hnsw", HnswSpec)
def hnsw(spec, *, dim: int, n: int):
    """HNSW graph over the vectors, inner product: approximate, sub-millisecond queries."""
    import faiss

    index = faiss.IndexHNSWFlat(dim, spec.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = spec.ef_construction
    index.hnsw.efSearch = spec.ef_search
    return index


@RETRIEVAL.register("ivf_pq", IvfPqSpec)
def ivf_pq(spec, *, dim: int, n: int):
    """Inverted lists with product-quantised codes, inner product: compact, trained on a sample."""
    import faiss

    sample = min(n, spec.train_sample)
    if sample < 2**spec.nbits:
        raise UserError(
            f"retrieval: ivf_pq trains 2**nbits = {2**spec.nbits} codes per sub-vector, but only {sample} passages can train "
            f"them; use retrieval=flat_ip (exact, fast at this size) or lower retrieval.nbits "
            f"(e.g. {int(math.log2(max(2, sample)))})"
        )
    if dim % spec.m:
        raise UserError(
            f"retrieval.m: the vectors have {dim} dimensions, which {spec.m} sub-vectors do not divide; "
            f"use a divisor of {dim} (e.g. retrieval.m={_divisor_near(dim, spec.m)})"
        )
    nlist = min(spec.nlist or max(1, int(4 * math.sqrt(n))), sample)
    index = faiss.index_factory(dim, f"IVF{nlist},PQ{spec.m}x{spec.nbits}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.nprobe = spec.nprobe
    # The factory turns on polysemous training (codes ordered for Hamming pre-filtering, which engine's
    # search does not use): measured 170 s instead of 5 s to train on 3,000 vectors here.
    ivf.do_polysemous_training = False
    return index


def _divisor_near(dim: int, m: int) -> int:
    return min((d for d in range(1, dim + 1) if dim % d == 0), key=lambda d: abs(d - m))


def new_index(spec: IndexSpec, *, dim: int, n: int):
    """An empty (untrained for ivf_pq) index of ``spec.kind`` for ``n`` vectors of ``dim``."""
    return RETRIEVAL.build(spec, dim=dim, n=n)


def set_search_params(index, spec: IndexSpec) -> None:
    """Search-time knobs from the spec (they are not part of what was built)."""
    import faiss

    if isinstance(spec, HnswSpec) and hasattr(index, "hnsw"):
        index.hnsw.efSearch = spec.ef_search
    if isinstance(spec, IvfPqSpec):
        faiss.extract_index_ivf(index).nprobe = spec.nprobe
    if isinstance(index, faiss.IndexFlat):
        pick_flat_routes(index, batch=max(32, spec.batch_size))


_FLAT_ROUTE: dict[str, int] = {}
"""Per process, once timed: FAISS's ``distance_compute_blas_threshold`` for one query and for a batch."""
BLAS_THRESHOLD = 20
"""FAISS's own default for ``distance_compute_blas_threshold``."""
NO_BLAS = 1 << 30
"""A threshold no batch reaches: every search takes FAISS's non-BLAS route."""


def pick_flat_routes(index, *, batch: int = 64) -> dict[str, str]:
    """Time FAISS's two exact-search routes on this machine, for one query and for a batch.

    Why: FAISS chooses between its BLAS route (the OpenBLAS bundled in the faiss-cpu wheel) and its
    own loops by one process-wide setting, ``distance_compute_blas_threshold``, and which is faster
    depends on the CPU, the wheel and the batch size. Measured on the AMD EPYC here (faiss-cpu
    1.15.1, 1 thread, 100k x 384, quiet): one query 30 ms with FAISS's default setting and 11.6 ms
    with BLAS switched off (numpy's own search: 14.9 ms); 32 queries 55-66 ms with the default and
    355 ms with BLAS off (numpy: 77 ms). So both settings are timed once per process on a sample of
    this index, for one query and for ``batch`` queries, and ``flat_search`` applies the faster one to
    each call. Returns the route picked for each: {"single": "blas"|"loops", "batch": ...}.
    """
    import time

    import faiss

    if not _FLAT_ROUTE:
        n = min(index.ntotal, 20_000)
        if n < batch:
            _FLAT_ROUTE.update(single=BLAS_THRESHOLD, batch=BLAS_THRESHOLD)
        else:
            x = index.reconstruct_n(0, n)
            probe = faiss.IndexFlat(index.d, index.metric_type)
            probe.add(x)

            def best(threshold: int, queries, reps: int) -> float:
                faiss.cvar.distance_compute_blas_threshold = threshold
                times = []
                for _ in range(reps):
                    t = time.perf_counter()
                    probe.search(queries, 10)
                    times.append(time.perf_counter() - t)
                return min(times)

            for name, queries, reps in (("single", x[:1], 15), ("batch", x[:batch], 3)):
                blas, loops = best(BLAS_THRESHOLD, queries, reps), best(NO_BLAS, queries, reps)
                _FLAT_ROUTE[name] = NO_BLAS if loops < blas else BLAS_THRESHOLD
            faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    return {k: "loops" if v == NO_BLAS else "blas" for k, v in _FLAT_ROUTE.items()}


def flat_search(index, vecs: np.ndarray, k: int):
    """``index.search`` with the route timed faster for this many queries (flat indexes; others as is)."""
    import faiss

    if _FLAT_ROUTE and isinstance(index, faiss.IndexFlat):
        faiss.cvar.distance_compute_blas_threshold = _FLAT_ROUTE["single" if len(vecs) == 1 else "batch"]
    return index.search(vecs, k)


def build_params(spec: IndexSpec) -> dict:
    """The kind's own parameters that shape the built index (not search-time ones)."""
    own = set(type(spec).model_fields) - set(IndexSpec.model_fields) - SEARCH_TIME
    return {k: getattr(spec, k) for k in sorted(own)}


def batched(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def build(spec: IndexSpec, embedder, passages: list[Passage], *, progress: bool = True):
    """Embed ``passages`` in batches straight into a new index; returns (index, seconds by phase)."""
    import time

    from tqdm.auto import tqdm

    texts = [p.text for p in passages]
    t0 = time.perf_counter()
    embedder.fit(texts)  # tfidf learns its vocabulary; models do nothing
    dim = embedder.dim or int(embedder.embed(texts[:1]).shape[1])
    index = new_index(spec, dim=dim, n=len(texts))
    if not index.is_trained:
        rng = np.random.default_rng(0)
        pick = np.sort(rng.choice(len(texts), size=min(len(texts), spec.train_sample), replace=False))
        sample = np.concatenate([embedder.embed(b) for b in batched([texts[i] for i in pick], spec.batch_size)])
        index.train(sample)
        del sample
    t_train = time.perf_counter() - t0
    bar = tqdm(total=len(texts), desc=f"embed+index ({embedder.name})", unit="passage", disable=not progress)
    for batch in batched(texts, spec.batch_size):
        vecs = embedder.embed(batch)
        if vecs.shape[1] != dim:
            raise UserError(f"retrieval: embedder {embedder.name} gave {vecs.shape[1]} dimensions after {dim}")
        index.add(vecs)
        bar.update(len(batch))
    bar.close()
    return index, {"train_seconds": round(t_train, 3), "build_seconds": round(time.perf_counter() - t0, 3)}


def save(
    out_dir: Path, index, spec: IndexSpec, embedder, passages: list[Passage], corpus_label: str, sha256: str | None = None
) -> dict:
    """Write index.faiss, then meta.json (its presence marks a complete index); returns the meta.
    ``sha256``: the corpus hash when the caller has it already (hashing a large corpus is not free)."""
    import faiss

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{INDEX_FILE}.tmp{os.getpid()}"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out_dir / INDEX_FILE)
    meta = index_meta(spec, embedder, passages, corpus_label, sha256)
    meta["index_bytes"] = (out_dir / INDEX_FILE).stat().st_size
    write_json_atomic(out_dir / META_FILE, meta)
    return meta


def index_meta(spec: IndexSpec, embedder, passages: list[Passage], corpus_label: str, sha256: str | None = None) -> dict:
    """An index's meta (what it was built from and how), as meta.json holds it, without the file size."""
    return {
        "format": FORMAT,
        "kind": spec.kind,
        "params": build_params(spec),
        "embedder": {**embedder.identity, "state": embedder.state()},
        "corpus": {"source": corpus_label, "sha256": sha256 or corpus_sha256(passages), "passages": len(passages)},
        "passages": [p.row() for p in passages],
    }


def read_meta(path: Path) -> dict | None:
    """meta.json of an index dir, or None when there is no complete index there."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT or not (path / INDEX_FILE).is_file():
        return None
    return meta


def load(path: Path, *, mmap: bool = True):
    """(index, meta, how) from an index dir; ``how`` is 'mmap' or 'memory'."""
    import faiss

    meta = read_meta(path)
    if meta is None:
        raise UserError(f"retrieval.index_path: {path} holds no complete index (index.faiss + meta.json of format {FORMAT})")
    file = str(path / INDEX_FILE)
    if mmap:
        try:
            return faiss.read_index(file, faiss.IO_FLAG_MMAP), meta, "mmap"
        except RuntimeError:  # a kind whose reader cannot map its storage
            pass
    return faiss.read_index(file), meta, "memory"


def describe(identity: dict) -> str:
    return f"'{identity.get('name')}' ({identity.get('model')}, {identity.get('dim')} dimensions)"


def check_embedder(meta: dict, embedder, where: str) -> None:
    """Refuse an index whose vectors came from another embedder than the one embedding the queries."""
    built = meta["embedder"]
    if embedder.name == "tfidf" and built.get("name") == "tfidf":
        return  # its vocabulary is restored from the index itself
    if (built.get("name"), built.get("model"), built.get("dim")) != (embedder.name, embedder.model, embedder.dim):
        raise UserError(
            f"retrieval: the index at {where} was built with embedder {describe(built)}, but this run embeds queries with "
            f"{describe(embedder.identity)}; its vectors cannot be compared. Set retrieval.embedder={built.get('name')} "
            "(with the same model), or build a new index: drop retrieval.index_path and run stage build_index"
        )


def normalise_text(text: str) -> str:
    """How duplicate text is recognised: case and whitespace do not count."""
    return " ".join(text.lower().split())


@dataclass
class Exclude:
    """What one query must not get back: its own example (by id) and any passage with the same text."""

    ids: set[str] = field(default_factory=set)
    texts: set[str] = field(default_factory=set)
    """Already normalised (``normalise_text``)."""


class Retriever:
    """A loaded index with its passages and the embedder for queries."""

    def __init__(self, index, meta: dict, embedder, *, how: str = "memory"):
        self.index, self.meta, self.embedder, self.how = index, meta, embedder, how
        self.passages = [Passage(**row) for row in meta["passages"]]
        self._norm = [normalise_text(p.text) for p in self.passages]
        self._distance = meta["kind"] == "flat_l2"

    def search(self, queries: list[str], k: int, exclude: list[Exclude] | None = None, batch_size: int = 64):
        """Top ``k`` (passage index, score) per query, best first, none of them excluded.

        Over-fetches past the excluded hits (doubling until ``k`` remain or the corpus is
        exhausted), so an excluded passage never costs a query one of its ``k`` results.
        """
        n = len(self.passages)
        out = []
        for start in range(0, len(queries), batch_size):
            batch = queries[start : start + batch_size]
            vecs = self.embedder.embed(batch)
            excl = exclude[start : start + batch_size] if exclude else [Exclude() for _ in batch]
            fetch = min(n, k + max((len(e.ids) + len(e.texts) for e in excl), default=0) + 2)
            rows = self._search(vecs, fetch)
            for i, (q, e) in enumerate(zip(vecs, excl, strict=True)):
                hits, f = self._keep(rows[i], e, k), fetch
                while len(hits) < min(k, n) and f < n:
                    f = min(n, f * 4)
                    hits = self._keep(self._search(q[None, :], f)[0], e, k)
                out.append(hits)
        return out

    def _search(self, vecs: np.ndarray, fetch: int) -> list[list[tuple[int, float]]]:
        scores, ids = flat_search(self.index, np.ascontiguousarray(vecs, dtype=np.float32), fetch)
        if self._distance:
            scores = -scores
        return [
            [(int(i), float(s)) for i, s in zip(r_ids, r_scores, strict=True) if i >= 0]
            for r_ids, r_scores in zip(ids, scores, strict=True)
        ]

    def _keep(self, row: list[tuple[int, float]], e: Exclude, k: int) -> list[tuple[int, float]]:
        kept = [(i, s) for i, s in row if self.passages[i].id not in e.ids and self._norm[i] not in e.texts]
        return kept[:k]
