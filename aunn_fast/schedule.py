"""Learning-rate schedules: linear warm-up, then cosine, linear or no decay to a floor, as a pure function of step.

Because the learning rate depends on nothing but the step (and the schedule's settings), a
resumed run continues its schedule exactly, and :class:`StepSchedule` is an ordinary
``torch.optim.lr_scheduler.LRScheduler``: the trainer drives the caller's own scheduler and
this one the same way (``scheduler.step()`` after every optimizer step, ``state_dict`` in
the checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(
    step: int, total: int, lr: float, warmup_steps: int = 0, schedule: str = "cosine", min_lr: float = 0.0
) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a ``total``-step run.

    Warm-up: steps 0 .. warmup_steps-1 rise linearly to ``lr`` ((step+1)/warmup_steps of it, so no step
    is taken at lr 0). Then ``schedule`` decays from ``lr`` at the first step after warm-up to ``min_lr``
    at step total-1: "cosine" (half a cosine), "linear", or "constant" (stays at ``lr``). Steps past
    ``total`` keep the final value.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = total - 1 - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_lr + (lr - min_lr) * shape


class StepSchedule(LRScheduler):
    """Sets every param group's learning rate to ``rate(step)``, the step being ``last_epoch`` (the
    number of ``step()`` calls so far). Its state is the step alone: loading a saved state moves it
    to that step, on the curve of the ``rate`` it was built with (say, a resumed run's new settings).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, rate: Callable[[int], float]) -> None:
        self.rate = rate
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.rate(self.last_epoch)] * len(self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in super().state_dict().items() if key != "rate"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._last_lr = self.get_lr()
