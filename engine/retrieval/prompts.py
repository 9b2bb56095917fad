"""Retrieved passages into prompts: the ``{context}`` slot of ``retrieval.template``.

For each example the query is its last user turn; the top ``k`` passages (never the example
itself: not its own id, not a passage whose text equals the example or its answer) are
numbered into ``{context}`` and the original turn goes into ``{prompt}``. The chat template
then renders the conversation as usual, so every data shape and template works unchanged.

Contexts are cached per split in the run dir (``retrieval/contexts-<split>-<key>.json``), keyed
by the corpus hash, embedder, index kind and parameters and k: an epoch, a resumed run or a
second evaluation reads them instead of embedding again.

If passages push the answer past ``data.max_length``, the lowest-ranked ones are dropped until
it fits (counted as ``contexts_shortened``): truncation would cut the answer, not the context.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.files import write_json_atomic
from engine.retrieval.corpus import example_id, example_text
from engine.retrieval.index import Exclude, Retriever, normalise_text


def query_of(messages: list[dict]) -> str:
    """What an example asks: its last user turn."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def exclusions(messages: list[dict]) -> Exclude:
    """The example itself, by id and by text, and its answer's text."""
    texts = {normalise_text(example_text(messages))}
    if messages and messages[-1]["role"] == "assistant":
        texts.add(normalise_text(messages[-1]["content"]))
    return Exclude(ids={example_id(messages)}, texts=texts)


def context_text(passages: list[str]) -> str:
    return "\n".join(f"[{i}] {text}" for i, text in enumerate(passages, 1))


def insert(messages: list[dict], passages: list[str], template: str) -> list[dict]:
    """The conversation with its last user turn rendered through ``template`` (unchanged when no passage)."""
    if not passages:
        return messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    out = [dict(m) for m in messages]
    out[last]["content"] = template.format(context=context_text(passages), prompt=messages[last]["content"])
    return out


def cache_key(meta: dict, search: dict, k: int) -> str:
    """What the contexts depend on: corpus, embedder, index kind and parameters, search knobs, k."""
    parts = {
        "corpus": meta["corpus"]["sha256"],
        "embedder": {key: meta["embedder"].get(key) for key in ("name", "model", "dim")},
        "kind": meta["kind"],
        "params": meta["params"],
        "search": search,
        "k": k,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def contexts(
    retriever: Retriever, examples: list, k: int, *, cache: Path | None = None, key: str = ""
) -> tuple[list[list[str]], int]:
    """Passage ids for each example (top k, best first) and how many were searched now (not cached)."""
    ids = [example_id(e.messages) for e in examples]
    known: dict[str, list[str]] = {}
    if cache is not None and cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            known = saved["contexts"] if saved.get("key") == key else {}
        except (OSError, ValueError, KeyError):
            known = {}
    todo = [i for i, eid in enumerate(ids) if eid not in known]
    if todo:
        hits = retriever.search(
            [query_of(examples[i].messages) for i in todo], k, [exclusions(examples[i].messages) for i in todo]
        )
        for i, row in zip(todo, hits, strict=True):
            known[ids[i]] = [retriever.passages[j].id for j, _ in row]
        if cache is not None:
            write_json_atomic(cache, {"key": key, "k": k, "contexts": known})
    return [known[eid] for eid in ids], len(todo)


def augment(examples: list, context_ids: list[list[str]], retriever: Retriever, *, template: str, source: str, tokenizer,
            max_length: int, train_on_prompt: bool) -> tuple[list, int]:  # fmt: skip
    """The examples re-tokenized with their passages in the prompt; returns them and how many were shortened."""
    from engine.data import IGNORE, tokenize

    by_id = {p.id: p.text for p in retriever.passages}
    out, shortened = [], 0
    for ex, ids in zip(examples, context_ids, strict=True):
        texts = [by_id[i] for i in ids]
        for n in range(len(texts), -1, -1):
            new, cut = tokenize(source, insert(ex.messages, texts[:n], template), tokenizer, max_length, train_on_prompt)
            if not cut and any(label != IGNORE for label in new.labels):
                break
        shortened += n < len(texts)
        out.append(new)
    return out, shortened
