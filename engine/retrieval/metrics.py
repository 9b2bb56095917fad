"""Retrieval metrics on labelled queries: recall@k, MRR, nDCG@k (binary relevance).

Pure functions over ranked passage ids and the set of relevant ids, so they are checked by
hand-worked cases in the tests. Each is averaged over the queries; a query whose relevant ids
are all unknown to the index is an error in the labels, reported by ``read_queries``.
"""

from __future__ import annotations

import math
from pathlib import Path

from engine.errors import UserError
from engine.retrieval.corpus import jsonl_rows


def recall_at(ranked: list[str], relevant: set[str], k: int) -> float:
    """Share of the relevant passages found in the top ``k``."""
    return len(set(ranked[:k]) & relevant) / len(relevant) if relevant else 0.0


def reciprocal_rank(ranked: list[str], relevant: set[str]) -> float:
    """1 / rank of the first relevant passage (0 when none was retrieved)."""
    return next((1.0 / r for r, pid in enumerate(ranked, 1) if pid in relevant), 0.0)


def ndcg_at(ranked: list[str], relevant: set[str], k: int) -> float:
    """DCG of the top ``k`` (gain 1 per relevant passage, discounted by log2(rank + 1)) over the ideal DCG."""
    dcg = sum(1.0 / math.log2(r + 1) for r, pid in enumerate(ranked[:k], 1) if pid in relevant)
    ideal = sum(1.0 / math.log2(r + 1) for r in range(1, min(k, len(relevant)) + 1))
    return dcg / ideal if ideal else 0.0


def score(rankings: list[list[str]], relevant: list[set[str]], ks: list[int]) -> dict:
    """recall@k and ndcg@k for each k, and MRR (over the ranking as retrieved: its length is max(ks))."""
    n = len(rankings)
    out: dict = {"queries": n}
    for k in ks:
        out[f"recall@{k}"] = round(sum(recall_at(r, s, k) for r, s in zip(rankings, relevant, strict=True)) / n, 4)
    out["mrr"] = round(sum(reciprocal_rank(r, s) for r, s in zip(rankings, relevant, strict=True)) / n, 4)
    for k in ks:
        out[f"ndcg@{k}"] = round(sum(ndcg_at(r, s, k) for r, s in zip(rankings, relevant, strict=True)) / n, 4)
    return out


def read_queries(path: str | Path, known_ids: set[str]) -> list[tuple[str, set[str]]]:
    """(query, relevant ids) per line of a .jsonl of {query, relevant: [ids]}; bad lines are one UserError."""
    out, problems = [], []
    for n, row in jsonl_rows(Path(path), problems):
        q, rel = row.get("query") if isinstance(row, dict) else None, row.get("relevant") if isinstance(row, dict) else None
        if not isinstance(q, str) or not q.strip() or not isinstance(rel, list) or not rel:
            problems.append(f"line {n}: needs 'query' (text) and 'relevant' (a non-empty list of passage ids)")
            continue
        unknown = [r for r in rel if str(r) not in known_ids]
        if unknown:
            problems.append(f"line {n}: relevant id(s) {unknown} are not in the index's corpus")
            continue
        out.append((q, {str(r) for r in rel}))
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:5])
        raise UserError(f"retrieval.queries: {Path(path).name} has {len(problems)} bad line(s):\n{shown}")
    if not out:
        raise UserError(f"retrieval.queries: {Path(path).name} holds no query")
    return out
