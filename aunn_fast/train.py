"""Training loop: AdamW over shuffled index batches, logged, checkpointed, resumable.

The batch at every step is a pure function of (seed, step), so a resumed run sees
exactly the batches the uninterrupted run would have seen; with the optimizer state
restored from the checkpoint, a resumed CPU run reproduces the same losses.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import checkpoint
from .config import AUNNConfig
from .cuda_graph import GraphedTrainStep
from .data import Dataset, random_indices
from .model import AUNN

CHECKPOINT_NAME = "model.safetensors"
LOG_NAME = "log.csv"
LOG_FIELDS = ["step", "epoch", "loss", "accuracy", "indices_per_s", "elapsed_s"]
PERMUTE_LIMIT = 1 << 27  # above this many indices an epoch samples uniformly instead of permuting


@dataclass
class TrainConfig:
    """How to train. Exactly one of ``epochs`` and ``steps`` sets the length (steps wins)."""

    batch_size: int = 2048
    epochs: float = 10.0
    steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    log_every: int = 50
    save_every: int = 2000
    cuda_graph: bool = True  # on CUDA, replay full-size steps from one captured graph

    def __post_init__(self) -> None:
        for name in ("batch_size", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs must be a finite number > 0, got {self.epochs}")

    def total_steps(self, length: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * self.steps_per_epoch(length)))

    def steps_per_epoch(self, length: int) -> int:
        return max(1, math.ceil(length / self.batch_size))


class BatchSampler:
    """Index batches for every step: a fresh permutation per epoch, or uniform draws for huge data."""

    def __init__(self, length: int, batch_size: int, seed: int, device: torch.device) -> None:
        self.length, self.batch_size, self.seed, self.device = length, batch_size, seed, device
        self.steps_per_epoch = max(1, math.ceil(length / batch_size))
        self._epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def _generator(self, *key: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(hash((self.seed,) + key) & 0x7FFF_FFFF_FFFF_FFFF)
        return gen

    def indices(self, step: int) -> torch.Tensor:
        """int64 [<= batch_size] indices for this step, on the sampler's device."""
        if self.length > PERMUTE_LIMIT:
            return random_indices(self.length, self.batch_size, self._generator(1, step))
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = torch.randperm(self.length, device=self.device, generator=self._generator(0, epoch))
            self._epoch = epoch
        assert self._perm is not None
        return self._perm[within * self.batch_size:(within + 1) * self.batch_size]


def make_optimizer(model: AUNN, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; on CUDA fused, and capturable (so it can live in a CUDA graph) when cfg.cuda_graph."""
    on_cuda = model.device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=on_cuda, capturable=on_cuda and cfg.cuda_graph)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """Optimizer state as flat named tensors plus its param groups as JSON, for safetensors."""
    state = optimizer.state_dict()
    tensors = {f"optim.{pid}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
               for pid, entry in state["state"].items() for key, value in entry.items()}
    return tensors, json.dumps(state["param_groups"])


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: str) -> None:
    """Load the state ``optimizer_tensors`` saved (step counts, moments) into ``optimizer``.

    The settings of each param group stay ``optimizer``'s own, as it was built from the
    resumed run's config, overrides included: a changed learning rate takes effect, and a
    run checkpointed on CPU (plain AdamW) resumes on CUDA fused and capturable, as its
    CUDA graph needs.
    """
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    saved_groups = json.loads(groups)
    for saved, current in zip(saved_groups, optimizer.param_groups):
        saved.update({key: value for key, value in current.items() if key != "params"})
    optimizer.load_state_dict({"state": state, "param_groups": saved_groups})


def save_run(run_dir: Path, model: AUNN, optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig,
             elapsed_s: float) -> None:
    """Checkpoint a run: the model, the optimizer state, the step reached and the training time so far."""
    tensors, groups = optimizer_tensors(optimizer)
    model.save(run_dir / CHECKPOINT_NAME, extra=tensors, extra_metadata={
        "optimizer_groups": groups,
        "train_state": json.dumps({"step": step, "elapsed_s": elapsed_s, "train_config": asdict(cfg)}),
    })


def load_run(run_dir: Path, device: torch.device | str = "cpu", backend: str = "auto",
             precision: str = "auto") -> tuple[AUNN, dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """The model of a run directory, its training state, its extra tensors and its metadata.

    Raises ValueError for a checkpoint without training state (one not written by :func:`train`).
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    model = AUNN.load(path, backend=backend, precision=precision, map_location=device)
    tensors, metadata = checkpoint.read(path, device)
    if "train_state" not in metadata or "optimizer_groups" not in metadata:
        raise ValueError(f"{path} holds a model but no training state (step, optimizer), so its run cannot be "
                         "resumed; was it saved by `aunn condition --save`?")
    state = json.loads(metadata["train_state"])
    return model, state, checkpoint.extra_tensors(tensors), metadata


def read_log(path: Path, up_to_step: int = 1 << 62) -> list[dict[str, float]]:
    """The rows of a run's log.csv up to a step, as numbers; [] when there is no log."""
    if not path.exists():
        return []
    with path.open() as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return [row for row in rows if row["step"] <= up_to_step]


@torch.no_grad()
def accuracy(model: AUNN, idx: torch.Tensor, targets: torch.Tensor) -> float:
    return (model.predict(idx) == targets).float().mean().item() if idx.numel() else float("nan")


def check_data_fits(data: Dataset, cfg: AUNNConfig) -> None:
    """ValueError unless the data's indices 0 .. length-1 are all indices of a model with this config."""
    if data.length - 1 > cfg.max_index:
        raise ValueError(f"the data's {data.length} indices do not fit in bits={cfg.bits} "
                         f"(largest valid index {cfg.max_index})")


def train(model: AUNN, data: Dataset, cfg: TrainConfig, run_dir: str | Path | None = None,
          resume: bool = False, progress: bool = True) -> list[dict[str, float]]:
    """Train ``model`` on ``data``; returns the logged rows. Ctrl-C lets the step under way finish, then saves
    a checkpoint and raises KeyboardInterrupt (a second Ctrl-C interrupts at once).

    With ``run_dir``, writes ``log.csv`` and ``model.safetensors`` there (every ``save_every``
    steps and at the end, atomically). ``resume`` continues from that checkpoint.
    """
    run_path = Path(run_dir) if run_dir is not None else None
    check_data_fits(data, model.cfg)  # checked, like the backend's settings, before anything is written
    model.active_backend().check_settings()
    model.vocab, model.data_description = data.vocab, data.describe()
    optimizer = make_optimizer(model, cfg)
    start, elapsed_before = 0, 0.0
    if resume:
        if run_path is None:
            raise ValueError("resume needs a run directory")
        saved, state, extra, metadata = load_run(run_path, model.device)
        model.load_params(saved.params._asdict())
        restore_optimizer(optimizer, extra, metadata["optimizer_groups"])
        start, elapsed_before = int(state["step"]), float(state.get("elapsed_s", 0.0))
    total = cfg.total_steps(data.length)
    sampler = BatchSampler(data.length, cfg.batch_size, cfg.seed, model.device)
    rows = read_log(run_path / LOG_NAME, start) if run_path else []
    if run_path is not None:  # the log is cut back to the checkpoint, or begun at the first row
        run_path.mkdir(parents=True, exist_ok=True)
        if resume:
            _write_log(run_path / LOG_NAME, rows)
        else:
            (run_path / LOG_NAME).unlink(missing_ok=True)

    with _ctrl_c_between_steps() as pressed:
        graphed = None
        if cfg.cuda_graph and model.device.type == "cuda":
            graphed = GraphedTrainStep(model, optimizer, min(cfg.batch_size, data.length))
        step = start
        began, seen = time.perf_counter(), 0

        def elapsed() -> float:
            return elapsed_before + time.perf_counter() - began

        bar = tqdm(total=total, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
        try:
            while step < total:
                if pressed():
                    raise KeyboardInterrupt
                idx = sampler.indices(step)
                targets = data.targets(idx)
                if graphed is not None and idx.numel() == graphed.batch_size:
                    loss = graphed(idx, targets)
                else:
                    # a captured graph keeps using the gradient tensors it was captured with: zero, not free
                    optimizer.zero_grad(set_to_none=graphed is None)
                    loss = model.loss(idx, targets)
                    loss.backward()
                    optimizer.step()
                step += 1
                seen += idx.numel()
                bar.update(1)
                if step % cfg.log_every == 0 or step == total:
                    now = elapsed()
                    row = {"step": step, "epoch": step / sampler.steps_per_epoch, "loss": loss.item(),
                           "accuracy": accuracy(model, idx, targets),
                           "indices_per_s": seen / max(now - elapsed_before, 1e-9), "elapsed_s": now}
                    rows.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}",
                                    idx_s=f"{row['indices_per_s']:.3g}")
                    if run_path is not None:
                        _write_log(run_path / LOG_NAME, [row], append=True)
                if run_path is not None and step % cfg.save_every == 0:
                    save_run(run_path, model, optimizer, step, cfg, elapsed())
        except KeyboardInterrupt:
            if run_path is not None:
                save_run(run_path, model, optimizer, step, cfg, elapsed())
                bar.write(f"interrupted at step {step}; checkpoint saved to {run_path / CHECKPOINT_NAME}")
            raise
        finally:
            bar.close()
        if run_path is not None:
            save_run(run_path, model, optimizer, step, cfg, elapsed())
    return rows


@contextlib.contextmanager
def _ctrl_c_between_steps() -> Iterator[Callable[[], bool]]:
    """A first Ctrl-C (SIGINT) is noted, not raised, so that the step under way completes (weights, optimizer
    state, step count and log row stay consistent) and training stops after it; a second one raises at once.
    Yields whether Ctrl-C was pressed. Outside the main thread, where Python delivers no signals, a no-op."""
    pressed: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def note(signum: int, frame: object) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def _write_log(path: Path, rows: list[dict[str, float]], append: bool = False) -> None:
    """Write rows to a new log (with its header), or append them (a header first if there is no log yet)."""
    header = not (append and path.exists())
    with path.open("a" if append else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if header:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: (int(row[k]) if k == "step" else row[k]) for k in LOG_FIELDS})
