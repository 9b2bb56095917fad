"""Schema of the ``retrieval`` group (no heavy imports: validation reads it before anything loads).

One base schema, ``IndexSpec``, holds what every index kind shares: the corpus, the embedder,
how many passages go into each prompt and through which template, the labelled queries. Each
kind adds only its own knobs (``hnsw``: graph degree and search breadth; ``ivf_pq``: lists,
code size, lists probed), so ``retrieval=hnsw`` swaps the whole subtree and leaves no dead key.
"""

from __future__ import annotations

import string
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from engine.registry import Registry, Spec

RETRIEVAL = Registry("retrieval")

EXAMPLES = "examples"
"""``retrieval.corpus`` value: the run's own training examples (the train split, never a held-out one)."""


class NoRetrievalSpec(Spec):
    """Retrieval off: nothing is embedded or loaded, and prompts are the data group's own."""


class IndexSpec(Spec):
    corpus: str = EXAMPLES
    """What is searched: 'examples' (the training split), a .jsonl of passages ({id, text, source?, title?}),
    or a folder of .txt/.md/.pdf."""
    embedder: str = "minilm"
    """minilm (all-MiniLM-L6-v2, offline), llm_mean_pool (the run's base model, masked mean of the last hidden state), tfidf."""
    k: int = Field(5, ge=0)
    """Passages put into each prompt; 0 = the index is built and scored, prompts stay plain."""
    in_training: bool = True
    """Insert the passages into the training prompts too; false = only the evaluation's 'with retrieval' variant gets them."""
    template: str = "Use the passages below if they help.\n\n{context}\n\nQuestion: {prompt}"
    """The last user turn when retrieval is on: {context} = the numbered passages, {prompt} = the original turn."""
    queries: str | None = None
    """Labelled queries (.jsonl of {query, relevant: [passage ids]}) for recall@k, MRR and nDCG@k; null = none."""
    metrics_k: list[int] = [1, 5, 10]
    """Cut-offs of recall@k and nDCG@k on the labelled queries."""
    batch_size: int = Field(64, ge=1)
    """Texts per embedding batch: only one batch of vectors is held besides the index."""
    chunk_tokens: int = Field(128, ge=8)
    """A documents folder is cut into passages of this many tokens (the run's tokenizer) ..."""
    overlap: int = Field(16, ge=0)
    """... sharing this many tokens with their neighbour."""
    index_path: str | None = None
    """A built index dir (index.faiss + meta.json, e.g. another run's retrieval/) to load instead of building."""
    mmap: bool = True
    """Load index.faiss memory-mapped where the index kind allows (pages read on demand), else into memory."""

    @field_validator("corpus")
    @classmethod
    def _corpus_exists(cls, v: str) -> str:
        if v == EXAMPLES:
            return v
        p = Path(v).expanduser()
        if p.is_dir() or (p.is_file() and p.suffix == ".jsonl"):
            return v
        why = "no such file or folder" if not p.exists() else "not a .jsonl file or a folder"
        raise ValueError(f"{v}: {why}; use 'examples' (the training split), a .jsonl of passages, or a documents folder")

    @field_validator("embedder")
    @classmethod
    def _embedder_registered(cls, v: str) -> str:
        from engine.retrieval.embedders import EMBEDDERS

        if v not in EMBEDDERS:
            raise ValueError(EMBEDDERS.unknown_message(v))
        return v

    @field_validator("template")
    @classmethod
    def _template_slots(cls, v: str) -> str:
        try:
            slots = {name for _, name, _, _ in string.Formatter().parse(v) if name is not None}
        except ValueError as e:
            raise ValueError(
                f"not a format string ({e}); write {{context}} and {{prompt}}, and {{{{ }}}} for literal braces"
            ) from None
        missing, extra = {"context", "prompt"} - slots, slots - {"context", "prompt"}
        if missing or extra:
            what = [f"needs {', '.join('{' + m + '}' for m in sorted(missing))}"] if missing else []
            what += [f"unknown slot(s) {', '.join('{' + e + '}' for e in sorted(extra))}"] if extra else []
            raise ValueError(f"{'; '.join(what)}; the slots are {{context}} (the passages) and {{prompt}} (the user's turn)")
        return v

    @field_validator("queries", "index_path")
    @classmethod
    def _path_exists(cls, v: str | None, info) -> str | None:
        if v is None:
            return v
        p = Path(v).expanduser()
        if info.field_name == "index_path" and not (p / "index.faiss").is_file():
            raise ValueError(f"{v}: no index.faiss in it; point it at a run's retrieval/ dir (written by stage build_index)")
        if info.field_name == "queries" and not p.is_file():
            raise ValueError(f"{v}: no such file; a .jsonl of {{query, relevant: [passage ids]}}")
        return v

    @field_validator("metrics_k")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError(f"{v}: give one or more cut-offs >= 1, e.g. [1, 5, 10]")
        return sorted(set(v))

    @model_validator(mode="after")
    def _chunking(self):
        if self.overlap >= self.chunk_tokens:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than chunk_tokens ({self.chunk_tokens})")
        return self


class FlatIpSpec(IndexSpec):
    """Exact search, inner product of L2-normalised vectors (= cosine similarity)."""


class FlatL2Spec(IndexSpec):
    """Exact search, Euclidean distance."""


class HnswSpec(IndexSpec):
    m: int = Field(32, ge=4, le=256)
    """Graph neighbours per node: more = better recall, more memory (4*m ints per vector) and slower build."""
    ef_construction: int = Field(80, ge=8)
    """Candidates kept while inserting: more = a better graph, slower build."""
    ef_search: int = Field(64, ge=1)
    """Candidates kept while searching (at least k): the recall/latency knob (bench/retrieval.py)."""


class IvfPqSpec(IndexSpec):
    nlist: int | None = Field(None, ge=1)
    """Inverted lists (k-means cells); null = about 4*sqrt(passages), the usual rule."""
    m: int = Field(16, ge=1)
    """Sub-vectors per code (FAISS's M; the vector dimension must divide by it): code size = m * nbits / 8 bytes."""
    nbits: int = Field(8, ge=1, le=16)
    """Bits per sub-vector code; training needs at least 2**nbits passages."""
    nprobe: int = Field(16, ge=1)
    """Lists searched per query: more = better recall, slower."""
    train_sample: int = Field(50_000, ge=1)
    """Passages (a seeded random sample) the quantisers are trained on."""
