"""Batches of tokenized examples: deterministic order, dynamic padding, optional packing.

The unit of batching is a *row*: one example, or with packing several examples laid end
to end. Rows are formed once (packing is seeded only by lengths, so it is the same on
every machine); epoch ``e`` then orders rows by a permutation seeded by ``seed + e``. So
a position in the stream (epoch, index) identifies exactly which examples come next:
what crash-resume needs.

Packing: rows are filled best-fit-decreasing up to ``max_length`` tokens. Position ids
restart at 0 for every example, and the attention mask is a 4D additive block-diagonal
causal mask (B x 1 x T x T; 0 where allowed, dtype-min elsewhere): restarting position
ids alone does not stop attention from crossing examples (measured, ENV-NOTES). The
first token of each packed example is not a label: unpacked, no position predicts it.

Preference pairs (an example whose ``rejected`` is set) are one unit of batching: a
micro-batch of n pairs is 2n rows, the n chosen conversations then the n rejected ones in
the same order, with ``pairs`` = n (``pair_collate``). The preference losses read that
layout, and the training loop's OOM split cuts along pairs, never between a pair's rows.
Packing is refused for pairs at validation (engine/checks.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import torch

IGNORE = -100
GROUP_WINDOW = 32
"""Length grouping sorts within windows of this many batches: similar lengths, still shuffled."""


def pad_collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the longest in the batch."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        mask[i, :k] = 1
    # real_tokens: non-pad tokens in the batch (throughput is reported in real tokens).
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "real_tokens": mask.sum()}


def pair_collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """Preference pairs: rows [chosen_1..n, rejected_1..n], right-padded together; ``pairs`` = n."""
    batch = pad_collate([*examples, *(e.rejected for e in examples)], pad_id)
    batch["pairs"] = len(examples)
    return batch


def packed_collate(
    rows: list[list], pad_id: int, mask_dtype: torch.dtype = torch.float32, segments: bool = False
) -> dict[str, torch.Tensor]:
    """Several examples per row; restarted position ids and a block-diagonal causal mask.

    ``segments=True`` (models on engine/attention.py's ``sdpa_segments``): instead of the
    [rows, 1, T, T] mask, each row's example lengths (``segment_lengths``, 0-padded) and a
    plain 2D padding mask; attention then runs causally per example.
    """
    n = max(sum(len(e.input_ids) for e in row) for row in rows)
    b = len(rows)
    ids = torch.full((b, n), pad_id, dtype=torch.long)
    labels = torch.full((b, n), IGNORE, dtype=torch.long)
    pos = torch.zeros((b, n), dtype=torch.long)
    segment = torch.full((b, n), -1, dtype=torch.long)  # -1: padding
    for i, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row):
            k = len(e.input_ids)
            ids[i, at : at + k] = torch.tensor(e.input_ids)
            labels[i, at : at + k] = torch.tensor(e.labels)
            labels[i, at] = IGNORE
            pos[i, at : at + k] = torch.arange(k)
            segment[i, at : at + k] = s
            at += k
        pos[i, at:] = torch.arange(n - at)
    real = (segment >= 0).sum()
    if segments:
        lengths = torch.zeros((b, max(len(row) for row in rows)), dtype=torch.long)
        for i, row in enumerate(rows):
            lengths[i, : len(row)] = torch.tensor([len(e.input_ids) for e in row])
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": (segment >= 0).long(),
            "position_ids": pos,
            "segment_lengths": lengths,
            "real_tokens": real,
        }
    causal = torch.ones((n, n), dtype=torch.bool).tril()
    # Padding attends to earlier padding only (never a fully masked row: no NaN in softmax).
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    mask = torch.zeros((b, 1, n, n), dtype=mask_dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos, "real_tokens": real}


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices grouped into rows of at most ``capacity`` tokens.

    Deterministic (ties broken by index), O(n log n) searches over the open rows' free space.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row id), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[i]
        j = bisect.bisect_left(free, (need, -1))
        if j < len(free):
            room, r = free.pop(j)
            rows[r].append(i)
            bisect.insort(free, (room - need, r))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - need, len(rows) - 1))
    return rows


def collate(
    rows: list, pad_id: int, *, packing: bool = False, mask_dtype: torch.dtype = torch.float32, segments: bool = False
) -> dict[str, torch.Tensor]:
    """One micro-batch, whichever kind: packed rows (each a list of examples), preference pairs, or examples.

    The one choice ``Batches`` and a streamed split (engine/data/stream.py) both make.
    """
    if packing:
        return packed_collate(rows, pad_id, mask_dtype, segments)
    if getattr(rows[0], "rejected", None) is not None:
        return pair_collate(rows, pad_id)
    return pad_collate(rows, pad_id)


class Batches:
    """Micro-batches over a list of examples, sharded by rank, repeated over epochs."""

    def __init__(
        self,
        examples,
        *,
        micro_batch_size: int,
        pad_id: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        packing: bool = False,
        group_by_length: bool = False,
        max_length: int | None = None,
        mask_dtype: torch.dtype = torch.float32,
        segments: bool = False,
    ):
        self.examples = examples
        self.mbs = micro_batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.rank, self.world = rank, world
        self.packing, self.group_by_length = packing, group_by_length
        self.mask_dtype, self.segments = mask_dtype, segments
        # A cached split (``StoredSplit``) carries its token counts: no example is read to batch it.
        stored = getattr(examples, "lengths", None)
        lengths = stored.tolist() if stored is not None else [_length(e) for e in examples]
        self._sequence_lengths = getattr(examples, "sequence_lengths", None)
        if packing:
            capacity = max_length or max(lengths, default=1)
            self.rows = pack(lengths, max(capacity, max(lengths, default=1)))
        else:
            self.rows = [[i] for i in range(len(examples))]
        self.row_lengths = [sum(lengths[i] for i in row) for row in self.rows]

    def __len__(self) -> int:
        """Micro-batches per epoch for one process."""
        return max(1, len(self.rows) // (self.mbs * self.world))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of epoch ``epoch``, as lists of row indices.

        The rows left over after the last full batch are drawn at random each epoch (the
        permutation's tail), so no row is always left out. Length grouping sorts within
        windows of the permutation, then shuffles the batches. Packed rows are always
        grouped: they are nearly full, so grouping costs no randomness but saves padding.
        """
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.rows), generator=g).tolist()
        per = self.mbs * self.world
        full = len(order) // per * per
        if full == 0:
            return [order[self.rank * self.mbs : (self.rank + 1) * self.mbs] or order[: self.mbs]]
        order = order[:full]
        grouped = self.group_by_length or self.packing
        if grouped:
            window = per * GROUP_WINDOW
            order = [
                i for w in range(0, full, window) for i in sorted(order[w : w + window], key=lambda i: (-self.row_lengths[i], i))
            ]
        batches = [order[i : i + per] for i in range(0, full, per)]
        if grouped:  # the longest batch no longer always comes first
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return [b[self.rank * self.mbs : (self.rank + 1) * self.mbs] for b in batches]

    def collate(self, batch: list[int]) -> dict[str, torch.Tensor]:
        if self.packing:
            rows = [[self.examples[i] for i in self.rows[r]] for r in batch]
        else:
            rows = [self.examples[self.rows[r][0]] for r in batch]
        return collate(rows, self.pad_id, packing=self.packing, mask_dtype=self.mask_dtype, segments=self.segments)

    def stream(self, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Yield micro-batches forever, skipping the first ``start`` (resume position)."""
        pos, epoch = 0, 0
        while True:
            for batch in self.epoch_batches(epoch):
                if pos >= start:
                    yield self.collate(batch)
                pos += 1
            epoch += 1

    def padding_efficiency(self, epoch: int = 0) -> float:
        """Real tokens / (real + pad) over one epoch of this process's batches."""
        real = total = 0
        for batch in self.epoch_batches(epoch):
            if self.packing:
                lengths = [self.row_lengths[r] for r in batch]
            else:  # a pair is two padded rows
                lengths = [n for r in batch for n in self._lengths_of(self.rows[r][0])]
            real += sum(lengths)
            total += len(lengths) * max(lengths)
        return round(real / total, 4) if total else 0.0

    def _lengths_of(self, i: int) -> list[int]:
        if self._sequence_lengths is None:
            return _sequence_lengths(self.examples[i])
        chosen, rejected = self._sequence_lengths
        return [int(chosen[i])] + ([int(rejected[i])] if rejected[i] else [])


def _length(example) -> int:
    """Tokens an example puts in a padded batch's widest row (a pair: its longer answer)."""
    return max(_sequence_lengths(example))


def _sequence_lengths(example) -> list[int]:
    rejected = getattr(example, "rejected", None)
    return [len(example.input_ids)] + ([len(rejected.input_ids)] if rejected is not None else [])
