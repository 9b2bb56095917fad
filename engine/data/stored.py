"""A prepared split read from the memory-mapped cache: a sequence of ``Example``s built on demand.

Why not lists: a million examples as Python lists of ints take gigabytes; the Arrow files
are mapped from disk, so a run holds only the examples it is batching. Batching and
packing read the stored token counts (``lengths``), never every example.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np

from engine.data.example import Example


class StoredSplit(Sequence):
    """The examples of one split of a cache entry (a ``datasets.Dataset``, memory-mapped)."""

    def __init__(self, dataset):
        self._ds = dataset
        table = dataset.data
        self.pairs = "r_input_ids" in dataset.column_names
        chosen = _ints(table, "n_tokens")
        rejected = _ints(table, "r_n_tokens") if self.pairs else np.zeros_like(chosen)
        self.sequence_lengths = (chosen, rejected)
        """Token counts of each example's sequences (a pair: chosen, rejected; else rejected is 0)."""
        self.lengths = np.maximum(chosen, rejected)
        """What an example puts in a padded batch's widest row (``collate.Batches`` reads these)."""

    def __len__(self) -> int:
        return self._ds.num_rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"example {i} of a split of {n}")
        return self._example(self._ds[int(i)])

    def __iter__(self) -> Iterator[Example]:
        for batch in self._ds.iter(batch_size=256):
            for k in range(len(batch["input_ids"])):
                yield self._example({c: v[k] for c, v in batch.items()})

    def _example(self, row: dict) -> Example:
        ex = Example(row["input_ids"], row["labels"], json.loads(row["messages"]))
        if self.pairs:
            ex.rejected = Example(row["r_input_ids"], row["r_labels"], json.loads(row["r_messages"]))
        return ex


def _ints(table, column: str) -> np.ndarray:
    return table.column(column).to_numpy().astype(np.int64)
