"""The ``data`` group and the ``prepare_data`` stage's work: file -> clean, split, tokenized.

Pipeline (top-down): read rows (``sources``; a documents folder is scored and chunked by
``documents``) -> shape each row into messages (``kind``, ``shapes``; text normalised) ->
drop empty and duplicate rows -> seeded split, or the separate validation/test files,
deduplicated across splits -> render with the template and tokenize, labelling only
assistant tokens unless ``train_on_prompt``. Every row that is not used is written to
rejected.jsonl with its reason and counted per reason in the metrics.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engine.data.shapes import SHAPES, TEXT_ROLE, Pair, RowError
from engine.data.sources import BadRow, DataError, read_rows
from engine.data.spec import DataSpec, DocumentsSpec
from engine.data.templates import render, render_with_spans, template_source, templated
from engine.files import shown_path

__all__ = ["SHAPES", "DataBundle", "DataError", "DataSpec", "Example", "prepare"]

IGNORE = -100
SPLITS = ("train", "validation", "test")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    messages: list[dict]
    rejected: Example | None = None
    """Kind preference: the same prompt with the rejected answer (``messages`` is the chosen
    conversation, so generation-based evaluation reads a preference example like any other)."""

    @property
    def prompt_messages(self) -> list[dict]:
        return self.messages[:-1]

    @property
    def reference(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class DataBundle:
    splits: dict[str, list[Example]]
    template: str
    metrics: dict = field(default_factory=dict)
    batching: dict = field(default_factory=dict)
    """Keyword arguments for ``collate.Batches`` (packing, group_by_length, max_length)."""
    documents: list = field(default_factory=list)
    """For kind documents: the scored ``Document`` records (what was used, what skipped)."""

    def prompt_text(self, ex: Example, tokenizer) -> str:
        """The example's prompt rendered up to the assistant's turn (for generation)."""
        return render(self.template, ex.prompt_messages, add_generation_prompt=True, tokenizer=tokenizer)


@dataclass
class _Rejects:
    """Rows not used, with reasons; written to rejected.jsonl, counted in metrics."""

    rows: list[dict] = field(default_factory=list)

    def add(self, source: str, row: int, reason: str, detail: str, data) -> None:
        self.rows.append({"file": source, "row": row, "reason": reason, "detail": detail, "data": data})

    def counts(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rows))


def prepare(spec: DataSpec, tokenizer, *, seed: int, run_dir: Path | None = None) -> DataBundle:
    """Read, clean, split and tokenize ``spec``'s data (``run_dir``: where reports go; rank 0)."""
    rejects = _Rejects()
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
    shaped = {name: _shape(spec, path, rows, rejects) for name, (path, rows) in sources.items()}

    # 2. Splits: the seeded ratio split for what no separate file provides; then every
    #    example lives in one split only (the separate files win over train).
    split_seed = spec.seed if spec.seed is not None else seed
    splits = split(shaped["train"], _ratios(spec, shaped), split_seed)
    for name in ("validation", "test"):
        if name in shaped:
            splits[name] = shaped[name]
    _dedupe_across(splits, rejects)

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
                data = msgs.as_dict() if isinstance(msgs, Pair) else msgs
                rejects.add(path, i, "no answer within max_length", f"prompt fills all {spec.max_length} tokens", data)

    if run_dir is not None and rejects.rows:
        with open(run_dir / "rejected.jsonl", "w") as f:
            for r in rejects.rows:  # the file as shown_path names it: no local path in the run dir
                f.write(json.dumps({**r, "file": shown_path(r["file"], run_dir)}, default=str, ensure_ascii=False) + "\n")
    if not out["train"]:
        raise _no_usable(spec.path, rows_read, rejects)

    train_tokens = sum(len(e.input_ids) for e in out["train"])
    if any(e.rejected is not None for e in out["train"]):  # a pair's rejected answer is trained on too
        train_tokens += sum(len(e.rejected.input_ids) for e in out["train"])
    metrics = {
        "kind": spec.kind,
        "kind_detected": spec.detected,
        "template": spec.template if source else None,
        "rows_read": rows_read,
        "rows_used": sum(len(v) for v in out.values()),
        "rows_rejected": len(rejects.rows),
        "rejected_by_reason": rejects.counts(),
        "truncated": truncated,
        **{f"{k}_examples": len(v) for k, v in out.items()},
        "train_tokens": train_tokens,
        "train_label_tokens": sum(_label_count(e) + _label_count(e.rejected) for e in out["train"]),
        "mean_train_length": round(train_tokens / _sequences(out["train"]), 1),
    }
    if documents:
        metrics["documents"] = len(documents)
        metrics["documents_used"] = sum(d.usable for d in documents)
        metrics["documents_skipped"] = {d.file: d.reason for d in documents if not d.usable}
    batching = {"packing": spec.packing, "group_by_length": spec.group_by_length, "max_length": spec.max_length}
    return DataBundle(out, source or (tokenizer.chat_template or ""), metrics, batching, documents)


def _shape(spec: DataSpec, path: str, rows: list, rejects: _Rejects) -> list[tuple[str, int, list[dict]]]:
    """(file, row number, messages) for every usable row; duplicates within the file rejected."""
    shape = SHAPES.get(spec.kind).builder
    seen: set[str] = set()
    out = []
    for i, row in enumerate(rows[: spec.limit] if spec.limit else rows):
        try:
            if isinstance(row, BadRow):
                raise RowError(row.reason, row.detail)
            if not isinstance(row, dict):
                raise RowError("wrong type", f"row is {type(row).__name__}, expected an object")
            msgs = shape(spec, row)
            key = _key(msgs)
            if key in seen:
                raise RowError("duplicate", "same example as an earlier row (after whitespace normalisation)")
            seen.add(key)
            out.append((path, i, msgs))
        except RowError as e:
            rejects.add(path, i, e.reason, e.detail, row.data if isinstance(row, BadRow) else row)
    return out


def _key(msgs: list[dict] | Pair) -> str:
    return json.dumps(msgs.as_dict() if isinstance(msgs, Pair) else msgs, sort_keys=True, ensure_ascii=False)


def _has_answer(ex: Example) -> bool:
    """Some label within max_length (for a pair: in both answers, or there is nothing to compare)."""
    return _label_count(ex) > 0 and (ex.rejected is None or _label_count(ex.rejected) > 0)


def _label_count(ex: Example | None) -> int:
    return 0 if ex is None else sum(t != IGNORE for t in ex.labels)


def _sequences(examples: list[Example]) -> int:
    return sum(1 + (e.rejected is not None) for e in examples)


def _ratios(spec: DataSpec, shaped: dict) -> dict[str, float]:
    """Split ratios for ``path``: a split given as its own file takes no share of it."""
    r = spec.split.model_dump()
    for name in ("validation", "test"):
        if name in shaped:
            r[name] = 0.0
    total = sum(r.values()) or 1.0
    return {k: v / total for k, v in r.items()}


def _dedupe_across(splits: dict[str, list], rejects: _Rejects) -> None:
    """An example in test is removed from validation and train; one in validation from train."""
    seen: set[str] = set()
    for name in ("test", "validation", "train"):
        kept = []
        for path, i, msgs in splits.get(name, []):
            key = _key(msgs)
            if key in seen:
                data = msgs.as_dict() if isinstance(msgs, Pair) else msgs
                rejects.add(path, i, "duplicate across splits", f"also in a held-out split; dropped from {name}", data)
                continue
            seen.add(key)
            kept.append((path, i, msgs))
        splits[name] = kept


def _no_usable(path: str, n: int, rejects: _Rejects) -> DataError:
    if not n:  # a documents folder whose documents were all skipped (sources refuse a file with no rows)
        return DataError(f"data.path: {path} gave no usable text; documents.json in the run dir says why for each file")
    if not rejects.rows:  # every row went to a held-out split
        return DataError(
            f"data.path: {path} has {n} usable rows and data.split puts none in train; give train a larger share or add rows"
        )
    first = "\n".join(f"  - {r['file']} row {r['row']}: {r['detail']}" for r in rejects.rows[:5])
    counts = ", ".join(f"{k}: {v}" for k, v in rejects.counts().items())
    return DataError(
        f"data.path: {path} has no usable training row ({n} read; rejected: {counts}). First problems:\n{first}\n"
        "Check the file's columns against data.kind (or map them with data.fields.<name>=<column>)."
    )


def split(items: list, ratios: dict[str, float], seed: int) -> dict[str, list]:
    """Seeded split by content hash: the same on every machine, exact proportions."""

    def key(item) -> str:
        msgs = item[2] if isinstance(item, tuple) else item
        return hashlib.sha256(f"{seed}:{_key(msgs)}".encode()).hexdigest()

    ordered = sorted(items, key=key)
    n = len(ordered)
    n_test = round(n * ratios["test"])
    n_val = round(n * ratios["validation"])
    return {
        "train": ordered[: n - n_test - n_val],
        "validation": ordered[n - n_test - n_val : n - n_test],
        "test": ordered[n - n_test :],
    }


def tokenize(source: str, messages: list[dict], tokenizer, max_length: int, train_on_prompt: bool, last_turn_only: bool = False):
    """Render + tokenize one conversation; label tokens inside assistant spans only (the last one: ``last_turn_only``).

    A plain-text example (kind text/documents) has no template: BOS (if the tokenizer has
    one) + text + EOS, every token labelled. Returns the example and 1 if it was truncated.
    """
    if messages and messages[0]["role"] == TEXT_ROLE:
        ids = tokenizer(messages[0]["content"], add_special_tokens=False)["input_ids"]
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
        ids = ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        labels = list(ids)
    else:
        text, spans = render_with_spans(source, messages, tokenizer)
        spans = spans[-1:] if last_turn_only else spans
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if train_on_prompt:
            labels = list(ids)
        else:
            labels = [
                tid if any(s <= start < e for s, e in spans) else IGNORE for tid, (start, _end) in zip(ids, offsets, strict=True)
            ]
    cut = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length], messages), int(cut)


def tokenize_pair(source: str, pair: Pair, tokenizer, max_length: int):
    """Both answers of a preference pair, each after the same rendered prompt; labels on the final answer only.

    Why only the final answer: earlier assistant turns of a multi-turn prompt are the same
    text in both conversations; they are context here, not what the pair prefers.
    Returns the chosen example (its ``rejected`` set) and 1 if either side was truncated.
    """
    sides = []
    for messages in (pair.chosen_messages, pair.rejected_messages):
        sides.append(tokenize(source, messages, tokenizer, max_length, train_on_prompt=False, last_turn_only=True))
    (chosen, cut_c), (rejected, cut_r) = sides
    chosen.rejected = rejected
    return chosen, int(cut_c or cut_r)
