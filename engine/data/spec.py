"""Schema of the ``data`` group (kept apart from the loaders so validation stays light).

One ``DataSpec`` serves every row shape; ``DocumentsSpec`` adds the knobs that only a
folder of documents needs (chunking, quality thresholds, archiving).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.registry import Spec

# Per shape: the logical fields a row provides and the column each is read from by default.
# ``data.fields.<logical>=<column>`` renames a column; any other key is a config error.
FIELDS: dict[str, dict[str, str]] = {
    "instruction": {"instruction": "instruction", "input": "input", "output": "output", "system": "system"},
    "qa": {"prompt": "question", "response": "answer", "system": "system"},
    "chat": {"messages": "messages"},
    "sharegpt": {"conversations": "conversations"},
    "text": {"text": "text"},
    "documents": {},
}

HUB_PREFIX = "hf:"
MISSING = "???"


class SplitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    train: float = Field(0.8, ge=0, le=1)
    validation: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self):
        if abs(self.train + self.validation + self.test - 1.0) > 1e-6:
            raise ValueError("train + validation + test must sum to 1")
        return self


def _check_path(v: str | None, key: str) -> str | None:
    if v is None or v.startswith(HUB_PREFIX):
        return v
    if v == MISSING:
        raise ValueError(f"required: point {key} at a data file, e.g. {key}=my_data.jsonl")
    if not Path(v).expanduser().exists():
        raise ValueError(
            f"no such file or directory: {v} (a .jsonl/.json/.csv/.parquet file, a folder, "
            f"a datasets save_to_disk folder, or {HUB_PREFIX}owner/name for the hub)"
        )
    return v


class DataSpec(Spec):
    path: str
    """A data file (.jsonl .json .csv .parquet), a ``datasets`` save_to_disk folder, or hf:owner/name."""
    validation_path: str | None = None
    """A separate validation file; then ``split`` only divides ``path`` into train and test."""
    test_path: str | None = None
    """A separate test file; then ``split`` only divides ``path`` into train and validation."""
    template: str = "model"
    """Chat template: model (the tokenizer's own), chatml, alpaca, llama2, mistral, phi, or a .jinja file."""
    system_prompt: str | None = None
    """Prepended as a system message when the row has none."""
    fields: dict[str, str] = {}
    """Column mapping for other names, e.g. {prompt: q, response: a} (qa) or {output: answer}."""
    max_length: int = Field(512, ge=8)
    """Tokens per example (and per packed row); longer examples are truncated and counted."""
    train_on_prompt: bool = False
    """False: loss only on response/assistant tokens. True: on every token."""
    packing: bool = False
    """Pack several examples into one row of max_length (attention blocked across them)."""
    group_by_length: bool = False
    """Batch examples of similar length together: less padding, slightly less random order."""
    split: SplitSpec = SplitSpec()
    seed: int | None = None
    """Split seed; null = the run's seed."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N rows (quick experiments)."""
    preview: int = Field(3, ge=1)
    """Examples the preview_data stage prints."""

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: str) -> str:
        return _check_path(v, "data.path")

    @field_validator("validation_path", "test_path")
    @classmethod
    def _other_exists(cls, v: str | None, info) -> str | None:
        return _check_path(v, f"data.{info.field_name}")

    @field_validator("template")
    @classmethod
    def _known_template(cls, v: str) -> str:
        from engine.data.templates import TEMPLATES

        if v == "model" or v in TEMPLATES:
            return v
        if v.endswith((".jinja", ".j2")) and Path(v).expanduser().is_file():
            return v
        raise ValueError(f"unknown template '{v}'; valid: model, {', '.join(sorted(TEMPLATES))}, or a .jinja file")

    @model_validator(mode="after")
    def _known_fields(self):
        valid = FIELDS.get(self.kind, {})
        unknown = sorted(set(self.fields) - set(valid))
        if unknown:
            names = ", ".join(valid) or "none"
            raise ValueError(f"fields: {', '.join(unknown)} not known for kind '{self.kind}'; valid: {names}")
        return self

    def column(self, name: str) -> str:
        """The row column that holds logical field ``name`` (after ``fields`` renames)."""
        return self.fields.get(name, FIELDS[self.kind][name])


class DocumentsSpec(DataSpec):
    path: str
    """A folder of .txt, .md and .pdf files (searched recursively)."""
    chunk_tokens: int = Field(256, ge=8)
    """Tokens per training chunk (at most max_length)."""
    overlap: int = Field(32, ge=0)
    """Tokens shared by neighbouring chunks, so no sentence is only ever seen cut."""
    min_chars: int = Field(200, ge=1)
    """Documents with less extracted text are skipped (e.g. scanned PDFs without OCR)."""
    max_garbage: float = Field(0.2, ge=0, le=1)
    """Documents whose share of garbage characters is above this are skipped."""
    archive_dir: str | None = None
    """Move the documents that were used here (stage archive_documents, after training)."""

    @model_validator(mode="after")
    def _chunking(self):
        if self.overlap >= self.chunk_tokens:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than chunk_tokens ({self.chunk_tokens})")
        if self.chunk_tokens > self.max_length:
            raise ValueError(f"chunk_tokens ({self.chunk_tokens}) must be at most max_length ({self.max_length})")
        if not self.path.startswith(HUB_PREFIX) and not Path(self.path).expanduser().is_dir():
            raise ValueError(f"path: {self.path} is not a folder; kind documents reads a folder of .txt/.md/.pdf")
        return self
