"""Schema of the ``data`` group (kept apart from the loaders so validation stays light).

One ``DataSpec`` serves every row shape; ``DocumentsSpec`` adds the knobs that only a
folder of documents needs (chunking, quality thresholds, archiving).

Validation reads the first rows of the data file (``sources.peek``, never the whole file):
``kind: auto`` becomes the shape those rows have, and a column a named shape needs but the
file lacks is reported with the columns that do exist. Both are config problems, so they
exit with status 2 before any weight loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from engine.data.kinds import AUTO, FIELDS, HUB_PREFIX, MISSING, REQUIRED, STREAM_TYPES  # noqa: F401  (re-exported)
from engine.registry import Spec


class SplitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    train: float = Field(0.8, ge=0, le=1)
    validation: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self):
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            got = f"{self.train:g} + {self.validation:g} + {self.test:g} = {total:g}"
            why = (
                f"train + validation + test must sum to 1, got {got}; e.g. data.split={{train: 0.8, validation: 0.1, test: 0.1}}"
            )
            raise _located(type(self), ((), got, why))
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
    """Column renames for this kind's fields, e.g. {prompt: q, response: a} (qa); unnamed ones keep their default."""
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
    cache: bool = True
    """Keep the prepared examples in $ENGINE_CACHE/data (memory-mapped), reused by every run with the same key (docs/data.md)."""
    num_proc: int | None = Field(None, ge=1)
    """Processes that render and tokenize on a cache miss; null = one per CPU core."""
    streaming: bool = False
    """Read the train file as a stream (render, tokenize, pack on the fly): for data larger than memory; needs train.max_steps."""
    shuffle_buffer: int = Field(10_000, ge=1)
    """Streaming: rows held and drawn from at random (a larger buffer shuffles better, holds more rows)."""

    _detected: str | None = PrivateAttr(None)

    @property
    def detected(self) -> str | None:
        """With ``kind: auto``: why this kind was chosen (e.g. "column 'conversations'"); else None."""
        return self._detected

    @model_validator(mode="wrap")
    @classmethod
    def _against_the_file(cls, data: Any, handler):
        """Validate the keys, then resolve ``kind: auto`` and check the columns against the file's first rows."""
        spec = handler(data)
        if not isinstance(data, dict) or (spec.kind not in REQUIRED and spec.kind != AUTO):
            return spec
        from engine.data.detect import Unfit, check_columns, detect
        from engine.data.sources import DataError, peek

        try:
            seen = peek(spec.path)
            if spec.kind == AUTO:
                kind, fields, why = detect(spec.path, seen, spec.fields)
                spec = handler({**data, "kind": kind, "fields": fields})
                spec._detected = why
            elif problems := check_columns(spec.path, seen, spec.kind, spec.fields):
                raise _located(cls, *((u.loc, u.value, u.message) for u in problems))
        except DataError as e:
            raise _located(cls, (("path",), spec.path, str(e).removeprefix("data.path: "))) from None
        except Unfit as e:
            raise _located(cls, (e.loc, e.value, e.message)) from None
        return spec

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
        from engine.data.templates import TEMPLATES, check_template_file

        if v == "model" or v in TEMPLATES:
            return v
        if v.endswith((".jinja", ".j2")) and Path(v).expanduser().is_file():
            problem = check_template_file(v)
            if problem:
                raise ValueError(problem)
            return v
        raise ValueError(f"unknown template '{v}'; valid: model, {', '.join(sorted(TEMPLATES))}, or a .jinja file")

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, v: dict[str, str], info) -> dict[str, str]:
        kind = info.data.get("kind")
        valid = FIELDS.get(kind, {})
        for name in v:
            if name not in valid:
                raise _located(cls, ((name,), name, _unknown_field(kind, name, v[name], valid)))  # pydantic prefixes 'fields'
        return v

    def column(self, name: str) -> str:
        """The row column that holds logical field ``name`` (after ``fields`` renames)."""
        return self.fields.get(name, FIELDS[self.kind][name])

    @model_validator(mode="after")
    def _streamable(self):
        """``streaming`` reads a local file (or save_to_disk folder) row by row: say so before anything loads."""
        if not self.streaming:
            return self
        p = Path(self.path).expanduser()
        if self.path.startswith(HUB_PREFIX) or not (p.is_dir() or p.suffix.lower() in STREAM_TYPES):
            why = (
                f"data.streaming reads a local {', '.join(STREAM_TYPES)} file or a datasets save_to_disk folder, not {self.path}"
            )
            raise _located(type(self), (("streaming",), True, f"{why}; use data.streaming=false"))
        return self


class TextSpec(DataSpec):
    packing: bool = True
    """Short texts share rows: no compute spent on padding (every token is trained on anyway)."""
    split: SplitSpec = SplitSpec(train=0.9, validation=0.05, test=0.05)
    """Continued pre-training wants most of the corpus for training."""


class DocumentsSpec(DataSpec):
    path: str
    """A folder of .txt, .md and .pdf files (searched recursively)."""
    packing: bool = True
    """Chunks of one document share rows with others: no compute spent on padding."""
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
        cls = type(self)
        if self.streaming:
            raise _located(
                cls, (("streaming",), True, "kind documents is read whole (scored, chunked); use data.streaming=false")
            )
        if self.overlap >= self.chunk_tokens:
            raise _located(
                cls, (("overlap",), self.overlap, f"{self.overlap} must be smaller than chunk_tokens ({self.chunk_tokens})")
            )
        if self.chunk_tokens > self.max_length:
            why = f"{self.chunk_tokens} must be at most max_length ({self.max_length})"
            raise _located(cls, (("chunk_tokens",), self.chunk_tokens, why))
        if not self.path.startswith(HUB_PREFIX) and not Path(self.path).expanduser().is_dir():
            raise _located(
                cls, (("path",), self.path, f"{self.path} is not a folder; kind documents reads a folder of .txt/.md/.pdf")
            )
        return self


def _unknown_field(kind: str, name: str, column: str, valid: dict[str, str]) -> str:
    """Why ``data.fields.<name>=<column>`` does not apply, and what does (a preset's stale map shows up here)."""
    if not valid:
        return f"kind '{kind}' reads no columns, so it takes no field renames; remove data.fields"
    default_of = [logical for logical, default in valid.items() if default == name]
    if default_of:  # data.fields.question=q: the column name where the field name belongs
        field = default_of[0]
        return (
            f"'{name}' is a column, not a field of kind '{kind}'; to read {field} from '{column}': data.fields.{field}={column}"
        )
    owners = [k for k, names in FIELDS.items() if name in names and k != AUTO]
    also = f" ('{name}' is a field of {', '.join(owners)})" if owners else ""
    example = f"data.fields.{next(iter(valid))}=<column>"
    return f"'{name}' is not a field of kind '{kind}'{also}; its fields: {', '.join(valid)}, e.g. {example}"


def _located(model: type[BaseModel], *problems: tuple[tuple, Any, str]) -> ValidationError:
    """Validation errors on single keys (``data.fields.prompt``): the report names each key, not the whole group.

    Each problem is (key path under ``data``, the value there, message).
    """
    details = [
        InitErrorDetails(type=PydanticCustomError("data", "{message}", {"message": message}), loc=loc, input=value)
        for loc, value, message in problems
    ]
    return ValidationError.from_exception_data(model.__name__, details)
