"""A folder of documents -> scored documents.json + token chunks for continued pre-training.

Why score first: a folder dumped from a drive holds scans without a text layer, OCR
garbage and near-empty files. Training on them teaches noise, so each document gets a
usability verdict (text extracted, length, share of garbage characters) with the reason,
and only usable ones are chunked. Chunks overlap by a few tokens so no sentence is only
ever seen cut in two.
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.data.shapes import normalize
from engine.data.sources import DataError
from engine.data.spec import DocumentsSpec

SUFFIXES = (".txt", ".md", ".pdf")
# Characters normal prose uses besides letters, digits and whitespace.
PROSE_PUNCTUATION = set(".,;:!?'\"()-–—%/&+°€$£")


@dataclass
class Document:
    file: str
    type: str
    chars: int = 0
    pages: int | None = None
    garbage_ratio: float = 0.0
    score: float = 0.0
    usable: bool = False
    reason: str = ""
    chunks: int = 0
    text: str = field(default="", repr=False)


def garbage_ratio(text: str) -> float:
    """Share of non-space characters that prose does not use (OCR noise, symbols, U+FFFD)."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 1.0
    ok = sum(1 for c in chars if c.isalpha() or c.isdigit() or c in PROSE_PUNCTUATION)
    bad = len(chars) - ok + sum(1 for c in chars if c == "\ufffd" or unicodedata.category(c) == "Co")
    return min(1.0, bad / len(chars))


def read_document(path: Path) -> tuple[str, int | None]:
    """Extracted text and page count (None for text files)."""
    if path.suffix.lower() == ".pdf":
        from pypdf import PdfReader

        reader = PdfReader(path)
        return "\n\n".join(page.extract_text() or "" for page in reader.pages), len(reader.pages)
    return path.read_bytes().decode("utf-8", errors="replace"), None


def score_documents(spec: DocumentsSpec) -> list[Document]:
    root = Path(spec.path).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"data.path: {root} has no .txt, .md or .pdf files")
    docs = []
    for p in files:
        doc = Document(file=str(p.relative_to(root)), type=p.suffix.lower().lstrip("."))
        try:
            text, doc.pages = read_document(p)
        except Exception as e:  # a corrupt PDF is one skipped document, not a failed run
            doc.reason = f"unreadable: {type(e).__name__}: {e}"
            docs.append(doc)
            continue
        text = normalize(text)
        doc.chars, doc.garbage_ratio = len(text), round(garbage_ratio(text), 4)
        length_ok = min(1.0, doc.chars / spec.min_chars)
        doc.score = round(length_ok * (1.0 - doc.garbage_ratio), 4)
        if doc.chars == 0:
            doc.reason = "no text extracted (a scan without a text layer?)"
        elif doc.chars < spec.min_chars:
            doc.reason = f"too short: {doc.chars} chars < min_chars {spec.min_chars}"
        elif doc.garbage_ratio > spec.max_garbage:
            doc.reason = f"garbage characters {doc.garbage_ratio:.0%} > max_garbage {spec.max_garbage:.0%}"
        else:
            doc.usable, doc.reason, doc.text = True, "ok", text
        docs.append(doc)
    return docs


def chunk(text: str, tokenizer, size: int, overlap: int) -> list[str]:
    """Token windows of ``size`` with ``overlap``, cut at token boundaries of the original text."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if not offsets:
        return []
    out, step = [], size - overlap
    for start in range(0, len(offsets), step):
        window = offsets[start : start + size]
        out.append(text[window[0][0] : window[-1][1]].strip())
        if start + size >= len(offsets):
            break
    return [c for c in out if c]


def document_rows(spec: DocumentsSpec, tokenizer, run_dir: Path | None) -> tuple[list[dict], list[Document]]:
    """Rows ``{"text", "document"}`` from the usable documents; documents.json in the run dir."""
    docs = score_documents(spec)
    rows = []
    for doc in docs:
        if doc.usable:
            pieces = chunk(doc.text, tokenizer, spec.chunk_tokens, spec.overlap)
            doc.chunks = len(pieces)
            rows.extend({"text": piece, "document": doc.file} for piece in pieces)
    if run_dir is not None:
        report = [{k: v for k, v in asdict(d).items() if k != "text"} for d in docs]
        (run_dir / "documents.json").write_text(json.dumps(report, indent=2))
    return rows, docs


def archive(spec: DocumentsSpec, files: list[str]) -> list[str]:
    """Move the used documents from ``path`` into ``archive_dir`` (same relative paths)."""
    root, dest = Path(spec.path).expanduser(), Path(spec.archive_dir).expanduser()
    moved = []
    for rel in files:
        src = root / rel
        if src.exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dest / rel))
            moved.append(rel)
    return moved
