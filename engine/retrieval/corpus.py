"""The corpus an index is built over: passages with an id, a text and where they came from.

Three sources, all turned into ``Passage`` rows:
  a .jsonl file   one passage per line: {"id", "text", "source"?, "title"?} (id defaults to the line)
  a folder        .txt/.md/.pdf documents, scored and chunked exactly as the data group's
                  ``documents`` kind does (engine/data/documents.py), in the run tokenizer's tokens
  'examples'      the training split's own examples ("Question: ... Answer: ..."), so similar
                  solved examples go into a prompt (the seed's retriever); an example's passage
                  id is its content hash, which is how it is never retrieved for itself

The corpus hash (sha256 over ids and texts, in order) is saved with the index: a changed
corpus is rebuilt, and cached contexts are keyed by it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.errors import UserError

EXAMPLES = "examples"


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    source: str
    title: str | None = None

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def load_corpus(corpus: str, *, examples: list | None = None, tokenizer=None, chunk_tokens: int = 128, overlap: int = 16):
    """The passages of ``corpus`` (see the module docstring); a corpus with none is a UserError."""
    if corpus == EXAMPLES:
        if examples is None:
            raise UserError("retrieval.corpus: 'examples' needs the prepared training split")
        passages = [Passage(example_id(e.messages), example_text(e.messages), "train") for e in examples]
    elif Path(corpus).expanduser().is_dir():
        passages = _documents(Path(corpus).expanduser(), tokenizer, chunk_tokens, overlap)
    else:
        passages = _jsonl(Path(corpus).expanduser())
    if not passages:
        raise UserError(f"retrieval.corpus: {corpus} gave no passages; it needs at least one non-empty text")
    return passages


def jsonl_rows(path: Path, problems: list[str]):
    """(line number, parsed row) per non-blank line; a line that is not JSON goes to ``problems``,
    so a caller reports every bad line of a file at once."""
    for n, line in enumerate(Path(path).expanduser().read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not JSON ({e.msg})")


def _jsonl(path: Path) -> list[Passage]:
    out, seen, problems = [], {}, []
    for n, row in jsonl_rows(path, problems):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            problems.append(f"line {n}: needs a non-empty 'text'")
            continue
        pid = str(row.get("id", f"{path.stem}:{n}"))
        if pid in seen:
            problems.append(f"line {n}: id {pid!r} repeats line {seen[pid]}")
            continue
        seen[pid] = n
        out.append(Passage(pid, " ".join(text.split()), str(row.get("source", path.name)), row.get("title")))
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:5])
        more = f"\n  ({len(problems) - 5} more)" if len(problems) > 5 else ""
        raise UserError(f"retrieval.corpus: {path.name} has {len(problems)} bad line(s):\n{shown}{more}")
    return out


def _documents(root: Path, tokenizer, chunk_tokens: int, overlap: int) -> list[Passage]:
    from engine.data.documents import chunk, score_documents
    from engine.data.spec import DocumentsSpec

    if tokenizer is None:
        raise UserError("retrieval.corpus: a documents folder is chunked in the run tokenizer's tokens; none was given")
    spec = DocumentsSpec(
        kind="documents", path=str(root), chunk_tokens=chunk_tokens, overlap=overlap, max_length=max(512, chunk_tokens)
    )
    out = []
    for doc in score_documents(spec):
        if doc.usable:
            for i, piece in enumerate(chunk(doc.text, tokenizer, chunk_tokens, overlap)):
                out.append(Passage(f"{doc.file}#{i}", piece, doc.file))
    return out


def example_id(messages: list[dict]) -> str:
    """A training example's passage id: the hash of its messages (the same in every split and run)."""
    key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
    return "example:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def example_text(messages: list[dict]) -> str:
    """An example as a passage: its turns as plain text, the last exchange as question and answer."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 2 and turns[0]["role"] == "user":
        return f"Question: {turns[0]['content']}\nAnswer: {turns[1]['content']}"
    return "\n".join(f"{m['role']}: {m['content']}" for m in turns)


def corpus_sha256(passages: list[Passage]) -> str:
    h = hashlib.sha256()
    for p in passages:
        h.update(p.id.encode())
        h.update(b"\0")
        h.update(p.text.encode())
        h.update(b"\n")
    return h.hexdigest()
