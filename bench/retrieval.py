"""Retrieval benchmark: build time, query latency and recall@10 of each index kind engine builds,
next to a plain numpy brute-force search on the same vectors.

    python bench/retrieval.py                          # 10k and 100k passages, every kind
    python bench/retrieval.py --sizes 10000 --queries 200   # quick
    python bench/retrieval.py --embed 2000             # also: minilm embed+index of ~100-token passages

Vectors: synthetic, dimension 384 (all-MiniLM-L6-v2's), clustered (``--clusters`` Gaussian
centres, each point a centre plus noise), L2-normalised, seeded. Queries are fresh points from
the same distribution, never in the index. The indexes are the ones engine builds
(``engine.retrieval.index.new_index`` with each preset's parameters), so the numbers describe
``retrieval=<kind>`` as shipped; hnsw is also measured at other ``ef_search`` values.

Per kind and size: build seconds (train + add), latency per query at batch 1 (p50/p99 over
``--queries`` single queries) and at batch 32 (p50/p99 of the per-batch time, and per query),
and recall@10 against exact inner-product search (flat_ip's results, which numpy's match).
numpy: ``X @ q`` and ``argpartition`` for the top 10, the baseline a user would write.

Results: bench/results/retrieval_<stamp>.json; the tables are printed for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIM, K = 384, 10


def vectors(n: int, clusters: int, seed: int, spread: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """(corpus, centres): n unit vectors around ``clusters`` random unit centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    pick = rng.integers(0, clusters, size=n)
    x = centres[pick] + spread * rng.standard_normal((n, DIM)).astype(np.float32) / np.sqrt(DIM) * 4
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32), centres


def numpy_search(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = q @ x.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def latency(search, q: np.ndarray, batch: int) -> dict:
    """p50/p99 milliseconds per call (and per query) over the queries in batches of ``batch``."""
    times = []
    search(q[:batch])  # warm-up
    for i in range(0, len(q) - batch + 1, batch):
        t = time.perf_counter()
        search(q[i : i + batch])
        times.append((time.perf_counter() - t) * 1000)
    p50, p99 = float(np.percentile(times, 50)), float(np.percentile(times, 99))
    return {"p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "p50_ms_per_query": round(p50 / batch, 4), "calls": len(times)}


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return round(float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found, exact, strict=True)])), 4)


def kinds():
    """(label, spec, search-time overrides) of every index engine ships, as its preset sets it."""
    import yaml

    from engine.retrieval import RETRIEVAL

    out = []
    for kind in ("flat_ip", "flat_l2", "hnsw", "ivf_pq"):
        node = yaml.safe_load((ROOT / "engine" / "conf" / "retrieval" / f"{kind}.yaml").read_text())
        node = {k: v for k, v in node.items() if k not in ("corpus", "queries")}
        spec = RETRIEVAL.get(kind).spec.model_validate(node)
        out.append((kind, spec))
    return out


def bench_size(n: int, args) -> dict:
    import faiss

    from engine.retrieval.index import flat_search, new_index, set_search_params

    x, _ = vectors(n, args.clusters, seed=n)
    q = vectors(n + args.queries, args.clusters, seed=n)[0][n:]  # same seed: the same centres, fresh points
    rows: dict = {}
    exact = numpy_search(x, q, K)
    rows["numpy"] = {
        "build_s": 0.0,
        "batch1": latency(lambda b: numpy_search(x, b, K), q, 1),
        "batch32": latency(lambda b: numpy_search(x, b, K), q, 32),
        "recall@10": 1.0,
    }
    for kind, spec in kinds():
        t = time.perf_counter()
        index = new_index(spec, dim=DIM, n=n)
        if not index.is_trained:
            rng = np.random.default_rng(0)
            index.train(x[rng.choice(n, size=min(n, spec.train_sample), replace=False)])
        index.add(x)
        build = time.perf_counter() - t
        settings = [("", spec)]
        if kind == "hnsw":
            settings += [(f" ef_search={ef}", spec.model_copy(update={"ef_search": ef})) for ef in args.ef_search]
        for suffix, s in settings:
            set_search_params(index, s)
            found = flat_search(index, q, K)[1]
            rows[kind + suffix] = {
                "build_s": round(build, 2),
                "batch1": latency(lambda b, i=index: flat_search(i, b, K), q, 1),
                "batch32": latency(lambda b, i=index: flat_search(i, b, K), q, 32),
                "recall@10": recall(found, exact),
                "params": {
                    k: getattr(s, k) for k in ("m", "ef_construction", "ef_search", "nlist", "nbits", "nprobe") if hasattr(s, k)
                },
            }
        del index
    print(f"faiss threads: {faiss.omp_get_max_threads()}", flush=True)
    return rows


def embed_passages(n: int) -> dict:
    """minilm embed + flat_ip index of n passages of ~100 tokens (shipped passages, concatenated)."""
    from engine.retrieval import FlatIpSpec
    from engine.retrieval.corpus import Passage, load_corpus
    from engine.retrieval.embedders import MiniLM
    from engine.retrieval.index import build

    shipped = [p.text for p in load_corpus(str(ROOT / "engine" / "samples" / "env_science_passages.jsonl"))]
    rng = np.random.default_rng(0)
    texts = [" ".join(shipped[j] for j in rng.choice(len(shipped), size=2, replace=False)) for _ in range(n)]
    emb = MiniLM(batch_size=64)
    tokens = [len(emb._model.tokenizer(t)["input_ids"]) for t in texts[:200]]
    t = time.perf_counter()
    build(
        FlatIpSpec(kind="flat_ip", batch_size=64), emb, [Passage(str(i), s, "bench") for i, s in enumerate(texts)], progress=True
    )
    seconds = time.perf_counter() - t
    return {
        "passages": n,
        "mean_tokens": round(float(np.mean(tokens)), 1),
        "seconds": round(seconds, 1),
        "passages_per_s": round(n / seconds, 1),
        "extrapolated_100k_minutes": round(100_000 / (n / seconds) / 60, 1),
    }


def table(size: int, rows: dict) -> str:
    lines = [
        f"**{size:,} passages** (dim {DIM}, clustered, unit length)",
        "",
        "| index | build s | batch 1 p50 ms | batch 1 p99 ms | batch 32 p50 ms (per query) | batch 32 p99 ms "
        "| recall@10 vs exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        b1, b32 = r["batch1"], r["batch32"]
        lines.append(
            f"| {name} | {r['build_s']} | {b1['p50_ms']} | {b1['p99_ms']} | {b32['p50_ms']} ({b32['p50_ms_per_query']}) | "
            f"{b32['p99_ms']} | {r['recall@10']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--queries", type=int, default=1024, help="queries per measurement (batch 1 and batch 32)")
    ap.add_argument("--clusters", type=int, default=200)
    ap.add_argument("--ef-search", default="16,32,128", help="hnsw ef_search values measured besides the preset's")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="FAISS OpenMP threads and numpy BLAS threads (1: no spin-waiting threads on a shared, loaded machine)",
    )
    ap.add_argument("--embed", type=int, default=0, help="also embed this many ~100-token passages with minilm")
    args = ap.parse_args()
    args.ef_search = [int(v) for v in args.ef_search.split(",") if v]
    import faiss

    faiss.omp_set_num_threads(args.threads)
    load = os.getloadavg()
    out = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": [round(v, 2) for v in load]},
        "sizes": {},
    }
    from threadpoolctl import threadpool_limits

    # numpy's BLAS gets the same number of threads as FAISS: the comparison is per thread.
    with threadpool_limits(args.threads):
        for n in [int(s) for s in args.sizes.split(",")]:
            out["sizes"][n] = bench_size(n, args)
            print(table(n, out["sizes"][n]) + "\n", flush=True)
    from engine.retrieval.index import _FLAT_ROUTE

    routes = {k: "loops" if v > 1_000_000 else "blas" for k, v in _FLAT_ROUTE.items()}
    out["machine"]["flat_routes"] = routes
    print(f"flat routes picked (single query, batch): {routes}", flush=True)
    if args.embed:
        out["embed"] = embed_passages(args.embed)
        print(json.dumps(out["embed"]), flush=True)
    out["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    dest = ROOT / "bench" / "results" / f"retrieval_{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    print(f"load average start {out['machine']['loadavg_start']}, end {out['machine']['loadavg_end']}; wrote {dest}")


if __name__ == "__main__":
    main()
