"""What the demo presets beyond the toy sequence need: training with a stepped learning-rate decay.

Constant-lr AdamW on an AUNN spikes after memorising (shared anchors: the toy demo fell from 100% to 84.5%
batch accuracy within 40 steps). Until the trainer has a schedule of its own, :func:`train_stepped` splits
a run into equal phases, each continuing the last (same optimizer state, batches and log) at a lower
learning rate.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .data import Dataset
from .model import AUNN
from .train import TrainConfig, train


def train_stepped(
    model: AUNN, data: Dataset, cfg: TrainConfig, run_dir: Path, lr_factors: tuple[float, ...], progress: bool = True
) -> list[dict[str, float]]:
    """Train for ``cfg.total_steps`` steps in ``len(lr_factors)`` equal phases at ``cfg.lr * factor`` each, every
    phase after the first resuming the run in ``run_dir`` (so the optimizer's moments carry over). Returns the
    logged rows of the whole run. ``lr_factors`` () trains once at ``cfg.lr``."""
    total = cfg.total_steps(data.length)
    factors = lr_factors or (1.0,)
    rows: list[dict[str, float]] = []
    for phase, factor in enumerate(factors):
        phase_end = total * (phase + 1) // len(factors)
        phase_cfg = replace(cfg, steps=phase_end, lr=cfg.lr * factor)
        rows = train(model, data, phase_cfg, run_dir, resume=phase > 0, progress=progress)
    return rows
