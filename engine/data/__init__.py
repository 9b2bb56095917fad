"""The ``data`` group and the ``prepare_data`` stage's work: file -> clean, split, tokenized.

Pipeline (top-down): read rows (``sources``; a documents folder is scored and chunked by
``documents``) -> shape each row into messages (``kind``, ``shapes``; text normalised) ->
drop empty and duplicate rows -> seeded split, or the separate validation/test files,
deduplicated across splits -> render with the template and tokenize, labelling only
assistant tokens unless ``train_on_prompt``. Every row that is not used is written to
rejected.jsonl with its reason and counted per reason in the metrics.

Two paths follow these rules (``rules``): local files are prepared once, in batches across
worker processes, into a memory-mapped cache shared by every run with the same key
(``cache``, ``build``; docs/data.md); a documents folder, a hub set or ``data.cache: false``
is prepared here, in memory.
"""

from __future__ import annotations

from pathlib import Path

from engine.data.example import IGNORE, DataBundle, Example
from engine.data.rules import (
    NO_ANSWER,
    SPLITS,
    Rejects,
    batching_of,
    data_metrics,
    dedupe_across,
    example_data,
    no_answer_detail,
    no_usable,
    ratios,
    shape_rows,
    split,
    write_rejected,
)
from engine.data.shapes import SHAPES, Pair
from engine.data.sources import DataError, read_rows
from engine.data.spec import DataSpec, DocumentsSpec
from engine.data.templates import template_source, templated
from engine.data.tokens import tokenize, tokenize_pair

__all__ = [
    "IGNORE",
    "SHAPES",
    "SPLITS",
    "DataBundle",
    "DataError",
    "DataSpec",
    "Example",
    "prepare",
    "split",
    "tokenize",
    "tokenize_pair",
]


def prepare(spec: DataSpec, tokenizer, *, seed: int, run_dir: Path | None = None) -> DataBundle:
    """Read, clean, split and tokenize ``spec``'s data (``run_dir``: where reports go; rank 0).

    Local files go through the cache (``data.cache``): a hit maps the prepared examples, a
    miss prepares them once into it. Everything else is prepared in memory. With
    ``data.streaming`` the train split is a ``TrainStream`` read while training.
    """
    from engine.data.cache import cacheable, prepare_cached

    if spec.streaming:
        from engine.data.stream import prepare_streaming

        return prepare_streaming(spec, tokenizer, seed=seed, run_dir=run_dir)
    if spec.cache and cacheable(spec):
        return prepare_cached(spec, tokenizer, seed=seed, run_dir=run_dir)
    return prepare_in_memory(spec, tokenizer, seed=seed, run_dir=run_dir)


def prepare_in_memory(spec: DataSpec, tokenizer, *, seed: int, run_dir: Path | None = None) -> DataBundle:
    """Every row read, shaped and tokenized in this process; the examples held as lists."""
    rejects = Rejects()
    documents = []
    # 1. Read and shape every source; bad rows are rejected with their reason.
    if isinstance(spec, DocumentsSpec):
        from engine.data.documents import document_rows

        rows, documents = document_rows(spec, tokenizer, run_dir)
        sources = {"train": (spec.path, rows)}
    else:
        sources = {"train": (spec.path, read_rows(spec.path))}
        if spec.validation_path:
            sources["validation"] = (spec.validation_path, read_rows(spec.validation_path, "data.validation_path"))
        if spec.test_path:
            sources["test"] = (spec.test_path, read_rows(spec.test_path, "data.test_path"))
    rows_read = sum(len(rows) for _, rows in sources.values())
    shaped = {name: shape_rows(spec, path, rows, rejects) for name, (path, rows) in sources.items()}

    # 2. Splits: the seeded ratio split for what no separate file provides; then every
    #    example lives in one split only (the separate files win over train).
    split_seed = spec.seed if spec.seed is not None else seed
    splits = split(shaped["train"], ratios(spec, set(shaped)), split_seed)
    for name in ("validation", "test"):
        if name in shaped:
            splits[name] = shaped[name]
    dedupe_across(splits, rejects)

    # 3. Render and tokenize; label assistant tokens only (or all, for text / train_on_prompt).
    source = template_source(spec.template, tokenizer) if templated(spec.kind) else ""
    out: dict[str, list[Example]] = {}
    truncated = 0
    for name in SPLITS:
        out[name] = []
        for path, i, msgs in splits.get(name, []):
            if isinstance(msgs, Pair):
                ex, cut = tokenize_pair(source, msgs, tokenizer, spec.max_length)
            else:
                ex, cut = tokenize(source, msgs, tokenizer, spec.max_length, spec.train_on_prompt)
            truncated += cut
            if _has_answer(ex):
                out[name].append(ex)
            else:
                rejects.add(path, i, NO_ANSWER, no_answer_detail(spec.max_length), example_data(msgs))

    if run_dir is not None and rejects.rows:
        write_rejected(rejects.rows, run_dir)
    if not out["train"]:
        raise no_usable(spec.path, rows_read, rejects)

    train_tokens = sum(len(e.input_ids) for e in out["train"])
    if any(e.rejected is not None for e in out["train"]):  # a pair's rejected answer is trained on too
        train_tokens += sum(len(e.rejected.input_ids) for e in out["train"])
    metrics = data_metrics(
        spec,
        templated=bool(source),
        rows_read=rows_read,
        rejects=rejects.counts(),
        truncated=truncated,
        sizes={k: len(v) for k, v in out.items()},
        train_tokens=train_tokens,
        train_label_tokens=sum(_label_count(e) + _label_count(e.rejected) for e in out["train"]),
        train_sequences=sum(1 + (e.rejected is not None) for e in out["train"]),
    )
    if documents:
        metrics["documents"] = len(documents)
        metrics["documents_used"] = sum(d.usable for d in documents)
        metrics["documents_skipped"] = {d.file: d.reason for d in documents if not d.usable}
    return DataBundle(out, source or (tokenizer.chat_template or ""), metrics, batching_of(spec), documents)


def _has_answer(ex: Example) -> bool:
    """Some label within max_length (for a pair: in both answers, or there is nothing to compare)."""
    return _label_count(ex) > 0 and (ex.rejected is None or _label_count(ex.rejected) > 0)


def _label_count(ex: Example | None) -> int:
    return 0 if ex is None else sum(t != IGNORE for t in ex.labels)
