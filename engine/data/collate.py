"""Batches of tokenized examples: deterministic order, dynamic padding.

The order of epoch ``e`` is a permutation seeded by ``seed + e``, so a position in the
stream (epoch, index) identifies exactly which examples come next: what resume needs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

IGNORE = -100


def pad_collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
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


class Batches:
    """Micro-batches over a list of examples, sharded by rank, repeated over epochs."""

    def __init__(self, examples, *, micro_batch_size: int, pad_id: int, seed: int, rank: int = 0, world: int = 1):
        self.examples = examples
        self.mbs = micro_batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        """Micro-batches per epoch for one process."""
        return max(1, len(self.examples) // (self.mbs * self.world))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        per = self.mbs * self.world
        full = [order[i : i + per] for i in range(0, len(order) - per + 1, per)] or [order]
        return [b[self.rank * self.mbs : (self.rank + 1) * self.mbs] or b[: self.mbs] for b in full]

    def stream(self, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Yield micro-batches forever, skipping the first ``start`` (resume position)."""
        pos, epoch = 0, 0
        while True:
            for idx in self.epoch_batches(epoch):
                if pos >= start:
                    yield pad_collate([self.examples[i] for i in idx], self.pad_id)
                pos += 1
            epoch += 1
