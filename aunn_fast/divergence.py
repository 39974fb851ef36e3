"""Training stops at the first non-finite loss, and never saves non-finite weights or optimizer state.

Each step's loss is copied into a small buffer on the device (one copy, no host sync); the buffer is
checked where the training loop syncs anyway (a log row, a checkpoint) or when it is full, so the
step reported is the first bad one, exactly. A non-finite gradient makes the weights non-finite, which
the next step's loss shows; a checkpoint is written only after its weights and moments are checked.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .errors import TrainingDiverged

BUFFER_STEPS = 1024  # losses kept between checks at most: a check (one sync) at least every this many steps


def advice(lr: float) -> str:
    return (
        f"likely cause: a learning rate too high for this model (lr {lr:g}); try a smaller one. The last "
        "checkpoint saved, if any, is kept as it was (no checkpoint is written from non-finite values). If a "
        "small learning rate diverges too, please report it"
    )


class LossWatch:
    """The losses of the steps since the last :meth:`check`, kept on the device."""

    def __init__(self, capacity: int, device: torch.device, lr: float) -> None:
        self.losses = torch.empty(max(1, min(capacity, BUFFER_STEPS)), device=device)
        self.first_step, self.count, self.lr = 0, 0, lr

    def record(self, step: int, loss: torch.Tensor) -> None:
        """Keep the loss of (1-based) step ``step``; checks the buffer when it is full."""
        if self.count == self.losses.numel():
            self.check()
        if self.count == 0:
            self.first_step = step
        self.losses[self.count].copy_(loss.detach())
        self.count += 1

    def check(self) -> None:
        """TrainingDiverged naming the first step since the last check whose loss was not finite."""
        kept = self.losses[: self.count]
        self.count = 0
        finite = torch.isfinite(kept)
        if kept.numel() and not bool(finite.all()):
            offset = int((~finite).int().argmax())
            raise TrainingDiverged(
                f"training diverged: the loss of step {self.first_step + offset} is "
                f"{float(kept[offset])}; {advice(self.lr)}"
            )


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], step: int, lr: float) -> None:
    """TrainingDiverged naming the first of the named tensors holding a NaN or an infinity."""
    for name, tensor in tensors:  # a sync each, at a checkpoint, which copies every tensor to the host anyway
        if not bool(torch.isfinite(tensor).all()):
            raise TrainingDiverged(
                f"training diverged: after step {step}, {name} holds non-finite values (a "
                f"non-finite gradient); {advice(lr)}"
            )
