"""Which indices every training step sees: exact epochs over [0, length), each global batch split among ranks.

Epoch e is the permutation :class:`~aunn_fast.permutation.IndexPermutation` keyed by
(seed, e). Step s is step ``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch``
and takes the positions [b*i, min(b*(i+1), length)) of that epoch's permutation (i the
step within the epoch, b the batch size): every index once per epoch, the last batch
of an epoch shorter when b does not divide the length. With ``world_size`` W, rank r
takes the contiguous r-th of W near-equal parts of that global batch, so the union of
the ranks' indices at a step is the same for every W. The batch is a pure function of
(seed, step, length, batch size): the same on every device and for every W.

:func:`focus_indices` picks the indices a step adds to its batch from a set the trainer keeps (the indices
a full-pass measurement found wrong: TrainConfig.focus), a pure function of the set and the step.
"""

from __future__ import annotations

import math

import torch

from .permutation import IndexPermutation

MATERIALISE_LIMIT = 1 << 27  # up to this many indices an epoch's order is computed whole, once (8 bytes each)
_CHUNK = 1 << 22  # positions permuted at a time when materialising, bounding the temporaries


class EpochSampler:
    """int64 index batches for every step, this rank's share of each global batch.

    Raises ValueError for a length outside [1, 2^63], a batch size below 1, or a rank outside [0, world_size).
    """

    def __init__(
        self, length: int, batch_size: int, seed: int, device: torch.device | str, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        IndexPermutation(length, seed, 0)  # checks length and seed
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.device, self.rank, self.world_size = torch.device(device), rank, world_size
        self.steps_per_epoch = max(1, math.ceil(length / batch_size))
        self._epoch: int | None = None
        self._permutation: IndexPermutation | None = None
        self._order: torch.Tensor | None = None  # the whole epoch's indices, when materialised

    def global_span(self, step: int) -> tuple[int, int, int]:
        """(epoch, first, end): step ``step`` takes positions [first, end) of epoch ``epoch``'s permutation."""
        epoch, within = divmod(step, self.steps_per_epoch)
        first = within * self.batch_size
        return epoch, first, min(first + self.batch_size, self.length)

    def global_batch_size(self, step: int) -> int:
        """Indices in the step's global batch (over all ranks): batch_size, or fewer at an epoch's end."""
        _, first, end = self.global_span(step)
        return end - first

    def share(self, step: int) -> tuple[int, int]:
        """This rank's positions [first, end) of the step's epoch: its contiguous part of the global batch."""
        _, first, end = self.global_span(step)
        size = end - first
        return first + self.rank * size // self.world_size, first + (self.rank + 1) * size // self.world_size

    def indices(self, step: int) -> torch.Tensor:
        """int64 [share] this rank's indices at ``step``, on the sampler's device (empty when the global batch
        has fewer indices than there are ranks)."""
        epoch = step // self.steps_per_epoch
        if epoch != self._epoch:
            self._permutation = IndexPermutation(self.length, self.seed, epoch)
            self._order = self._materialise(self._permutation) if self.length <= MATERIALISE_LIMIT else None
            self._epoch = epoch
        first, end = self.share(step)
        if self._order is not None:
            return self._order[first:end]
        assert self._permutation is not None
        return self._permutation(first + torch.arange(end - first, dtype=torch.int64, device=self.device))

    def _materialise(self, permutation: IndexPermutation) -> torch.Tensor:
        """int64 [length] the epoch's indices in order, computed in chunks."""
        order = torch.empty(self.length, dtype=torch.int64, device=self.device)
        for first in range(0, self.length, _CHUNK):
            end = min(first + _CHUNK, self.length)
            order[first:end] = permutation(torch.arange(first, end, dtype=torch.int64, device=self.device))
        return order


def focus_indices(chosen: torch.Tensor, step: int, count: int) -> torch.Tensor:
    """int64 [min(count, len(chosen))]: the indices of ``chosen`` (int64 [n]) that step ``step`` adds to its
    batch, ``chosen[(step * k + j) mod n]`` for j < k = min(count, n): consecutive steps walk through the set,
    each taking k distinct indices of it."""
    taken = min(count, chosen.numel())
    positions = (step * taken + torch.arange(taken, dtype=torch.int64, device=chosen.device)) % max(chosen.numel(), 1)
    return chosen[positions]
