"""A prepared split read from the memory-mapped cache: a sequence of ``Example``s built on demand.

Why not lists: a million examples as Python lists of ints take gigabytes; the Arrow file
is mapped from disk, so a run holds only the examples it is batching. Batching and
packing read the stored token counts (``lengths``), never every example.

Why a split is row numbers into the entry's one Arrow file: the rows are written once, as the
workers produce them; a split is the seeded order of its rows (``indices``), not a second copy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np

from engine.data.example import Example

COLUMNS = ("input_ids", "labels", "messages")
PAIR_COLUMNS = ("r_input_ids", "r_labels", "r_messages")
CHUNK = 256
"""Rows read at once when a split is iterated (one Arrow take per chunk)."""


class StoredSplit(Sequence):
    """The examples of one split of a cache entry: ``indices`` into ``rows`` (a memory-mapped ``datasets.Dataset``)."""

    def __init__(self, rows, indices: np.ndarray, *, pairs: bool):
        self.pairs = pairs
        self._rows = rows.select_columns([*COLUMNS, *(PAIR_COLUMNS if pairs else ())])
        self._indices = np.asarray(indices, dtype=np.int64)
        table = rows.data
        chosen = _ints(table, "n_tokens")[self._indices]
        rejected = _ints(table, "r_n_tokens")[self._indices] if pairs else np.zeros_like(chosen)
        self.sequence_lengths = (chosen, rejected)
        """Token counts of each example's sequences (a pair: chosen, rejected; else rejected is 0)."""
        self.lengths = np.maximum(chosen, rejected)
        """What an example puts in a padded batch's widest row (``collate.Batches`` reads these)."""

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"example {i} of a split of {n}")
        return self._example(self._rows[int(self._indices[i])])

    def __iter__(self) -> Iterator[Example]:
        for start in range(0, len(self), CHUNK):
            batch = self._rows[self._indices[start : start + CHUNK].tolist()]
            for k in range(len(batch["input_ids"])):
                yield self._example({c: v[k] for c, v in batch.items()})

    def _example(self, row: dict) -> Example:
        ex = Example(row["input_ids"], row["labels"], json.loads(row["messages"]))
        if self.pairs:
            ex.rejected = Example(row["r_input_ids"], row["r_labels"], json.loads(row["r_messages"]))
        return ex


def _ints(table, column: str) -> np.ndarray:
    return table.column(column).to_numpy().astype(np.int64)
