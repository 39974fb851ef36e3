"""Callbacks of :func:`aunn_fast.train.train`: what sees every logged row, and may stop the run.

A logged row is a dict with the columns of ``log.csv``: step, epoch, loss, accuracy (of the step's
batch), lr (of the step), full_accuracy (over the training data or its fixed sample; NaN on rows
where it was not measured), full_accuracy_indices (how many indices it scored; 0 when not
measured), indices_per_s and elapsed_s.
"""

from __future__ import annotations

import math
from typing import Any


class Callback:
    """Base class: override what you need. ``on_log`` returning True stops training after this step (the run
    is checkpointed as at its end); ``on_end`` sees every row once training stops (not after Ctrl-C)."""

    def on_log(self, row: dict[str, float]) -> bool | None:
        return None

    def on_end(self, rows: list[dict[str, float]]) -> None:
        return None


class StopAtAccuracy(Callback):
    """Stops at the first full-pass accuracy (``--eval-every``) of at least ``target`` (a fraction)."""

    def __init__(self, target: float) -> None:
        self.target = target

    def on_log(self, row: dict[str, float]) -> bool:
        return not math.isnan(row["full_accuracy"]) and row["full_accuracy"] >= self.target


class TensorBoardLogger(Callback):
    """Writes every logged figure as a TensorBoard scalar under ``train/`` (full-pass accuracy only where
    measured), and, through :meth:`log_metrics`, an evaluation's figures under ``eval/``.

    Needs the ``tensorboard`` package (``pip install aunn_fast[tensorboard]``); ImportError naming it if absent.
    """

    SCALARS = ("loss", "accuracy", "full_accuracy", "lr", "indices_per_s", "epoch")

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {exc}") from None
        self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    def on_log(self, row: dict[str, float]) -> None:
        step = int(row["step"])
        for name in self.SCALARS:
            if not math.isnan(row[name]):
                self.writer.add_scalar(f"train/{name}", row[name], step)
        self.writer.flush()

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """An evaluation's numbers (``metrics.json``: nested dicts flattened to ``eval/a/b``) at ``step``."""
        for name, value in _numbers(metrics):
            self.writer.add_scalar(f"eval/{name}", value, step)
        self.writer.flush()

    def on_end(self, rows: list[dict[str, float]]) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _numbers(tree: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(slash-joined key path, value) of every int or float in nested dicts (lists and strings skipped)."""
    if isinstance(tree, dict):
        return [pair for key, value in tree.items() for pair in _numbers(value, f"{prefix}{key}/")]
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return [(prefix.rstrip("/"), float(tree))]
    return []
