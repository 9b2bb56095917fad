"""The report's Retrieval section: the index, its scores on labelled queries, and QA with vs without it.

Reads plain values only: ``build_index`` and ``evaluate`` metrics as metrics.json nests them
(``evaluate.<split>`` fine-tuned, ``base.<split>``, ``finetuned_rag.<split>``, ``base_rag.<split>``).
The four QA columns answer the two questions users ask: does retrieval help this model (each
model with vs without), and does the fine-tune still need it (base with retrieval vs fine-tuned without).
"""

from __future__ import annotations

from engine.render.page import Block
from engine.report.style import number


def retrieval_blocks(metrics: dict, split: str, lower_is_better: frozenset[str] = frozenset()) -> list[Block]:
    """Blocks of the Retrieval section; none when the run built no index."""
    built = metrics.get("build_index")
    if not built:
        return []
    how = {"built": f"built in {built.get('build_seconds')} s", "reused": "reused", "index_path": "loaded"}.get(
        built.get("source"), str(built.get("source"))
    )
    out = [
        Block("h2", "Retrieval"),
        Block(
            "p",
            f"Index `{built.get('kind')}` over {built.get('passages')} passages from `{built.get('corpus')}`, embedder "
            f"{built.get('embedder')} ({built.get('dim')} dimensions), {how}, {built.get('index_mb')} MB, loaded "
            f"{built.get('loaded')}.",
        ),
    ]
    labelled = built.get("labelled_queries")
    if labelled:
        names = [k for k in labelled if k != "queries"]
        out += [
            Block("p", f"On {labelled.get('queries')} labelled queries (binary relevance):"),
            Block("table", header=names, rows=[[number(labelled[k]) for k in names]]),
        ]
    ev = metrics.get("evaluate", {})
    rag = ev.get("finetuned_rag", {}).get(split)
    if rag:
        added = {**metrics.get("prepare_data", {}), **built}  # build_index records these (prepare_data in older runs)
        k = added.get("retrieval_k")
        columns = [
            ("base", ev.get("base", {}).get(split, {})),
            ("base + retrieval", ev.get("base_rag", {}).get(split, {})),
            ("fine-tuned", ev.get(split, {})),
            ("fine-tuned + retrieval", rag),
        ]
        columns = [(name, values) for name, values in columns if values]
        names = [m for m in rag if isinstance(rag.get(m), int | float) and m != "numeric_examples"]
        rows = [[m, *(number(values.get(m)) for _, values in columns)] for m in names]
        trained = added.get("retrieval_in_training")
        note = (
            f"QA on the {split} split, the same questions with and without the top-{k} passages in the prompt "
            f"(the fine-tune was trained {'with' if trained else 'without'} them). Base + retrieval vs fine-tuned "
            "answers whether the fine-tune still needs retrieval; each model with vs without, whether retrieval helps it."
        )
        out += [Block("p", note), Block("table", header=["metric", *(n for n, _ in columns)], rows=rows)]
        verdicts = [_verdict(m, ev, split, lower_is_better) for m in names]
        out += [Block("p", " ".join(v for v in verdicts if v))] if any(verdicts) else []
    return out


def _verdict(metric: str, ev: dict, split: str, lower_is_better: frozenset[str]) -> str:
    base_rag = ev.get("base_rag", {}).get(split, {}).get(metric)
    tuned = ev.get(split, {}).get(metric)
    if not isinstance(base_rag, int | float) or not isinstance(tuned, int | float):
        return ""
    if abs(tuned - base_rag) < 1e-9:
        ahead = "tied"
    else:
        better = tuned < base_rag if metric in lower_is_better else tuned > base_rag
        ahead = "fine-tuned ahead" if better else "base + retrieval ahead"
    return f"{metric}: fine-tuned without retrieval {number(tuned)} vs base with retrieval {number(base_rag)} ({ahead})."
