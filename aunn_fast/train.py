"""Training loop: AdamW over shuffled index batches, logged, checkpointed, resumable.

The batch at every step is a pure function of (seed, step), so a resumed run sees
exactly the batches the uninterrupted run would have seen; with the optimizer state
restored from the checkpoint, a resumed CPU run reproduces the same losses.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import checkpoint, distributed, runlock
from .atomic import atomic_write
from .config import AUNNConfig
from .cuda_graph import GraphedTrainStep
from .data import Dataset
from .divergence import LossWatch, check_finite
from .errors import CheckpointError, UserInputError, UserTypeError
from .model import AUNN
from .sampler import EpochSampler

CHECKPOINT_NAME = "model.safetensors"
LOG_NAME = "log.csv"
LOG_FIELDS = ["step", "epoch", "loss", "accuracy", "indices_per_s", "elapsed_s", "world_size"]
MAX_STEPS = 2**53  # steps (and epochs, as their ratio) stay exact in a float64
MAX_SEED = 2**63 - 1


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
        """UserTypeError/UserInputError (TypeError/ValueError) for a field of the wrong type or range."""
        for name in ("batch_size", "log_every", "save_every", "seed", *(("steps",) if self.steps is not None else ())):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserTypeError(f"TrainConfig.{name} must be an int, got {type(value).__name__} {value!r}")
        for name in ("epochs", "lr", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise UserTypeError(f"TrainConfig.{name} must be a number, got {type(value).__name__} {value!r}")
        if not isinstance(self.cuda_graph, bool):
            raise UserTypeError(f"TrainConfig.cuda_graph must be a bool, got {type(self.cuda_graph).__name__}")
        for name in ("batch_size", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and not 0 <= self.steps <= MAX_STEPS:
            raise UserInputError(f"steps must be in 0..2**53, got {self.steps}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserInputError(f"seed must be in 0..2**63-1, got {self.seed}")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise UserInputError(f"epochs must be a finite number > 0, got {self.epochs}")
        for name in ("lr", "weight_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UserInputError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")

    def total_steps(self, length: int) -> int:
        """The run's length in steps; UserInputError if epochs over this data make more than 2**53."""
        if self.steps is not None:
            return self.steps
        steps = self.epochs * self.steps_per_epoch(length)
        if not steps <= MAX_STEPS:
            raise UserInputError(f"epochs={self.epochs:g} over {length:,} indices in batches of {self.batch_size} "
                                 f"make {steps:.3g} steps, more than a run can take (2**53)")
        return max(1, math.ceil(steps))

    def steps_per_epoch(self, length: int) -> int:
        return max(1, math.ceil(length / self.batch_size))


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
             elapsed_s: float, world_size: int = 1) -> None:
    """Checkpoint a run: the model, the optimizer state, the step reached, the training time so far and the
    number of processes it ran with. TrainingDiverged, and nothing written, if a weight or an optimizer moment
    is not finite."""
    tensors, groups = optimizer_tensors(optimizer)
    check_finite([*model.named_parameters(), *tensors.items()], step, cfg.lr)
    model.save(run_dir / CHECKPOINT_NAME, extra=tensors, extra_metadata={
        "optimizer_groups": groups,
        "train_state": json.dumps({"step": step, "elapsed_s": elapsed_s, "train_config": asdict(cfg),
                                   "world_size": world_size}),
    })


def load_run(run_dir: Path, device: torch.device | str = "cpu", backend: str = "auto", precision: str = "auto",
             reset_optimizer: bool = False
             ) -> tuple[AUNN, dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """The model of a run directory, its training state, its extra tensors and its metadata.

    Raises CheckpointError (a ValueError) for a checkpoint without training state (one not written by
    :func:`train`), or past step 0 without its optimizer state unless ``reset_optimizer``.
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    ckpt = checkpoint.load(path, device)
    if ckpt.train_state is None or ckpt.optimizer_groups is None:
        raise CheckpointError(path, "train_state", "absent: the file holds a model but no training state (step, "
                                                   "optimizer), so its run cannot be resumed; was it saved by "
                                                   "`aunn condition --save`?")
    step = ckpt.train_state["step"]
    if step > 0 and not ckpt.has_optimizer_state and not reset_optimizer:
        raise CheckpointError(path, "extra.optim", f"the optimizer state of step {step} is missing, so the run "
                                                   "cannot continue exactly; --reset-optimizer (reset_optimizer=True) "
                                                   "continues with a fresh AdamW")
    model = AUNN.from_checkpoint(ckpt, backend, precision)
    return model, ckpt.train_state, ckpt.extra, ckpt.metadata


def read_log(path: Path, up_to_step: int = 1 << 62) -> list[dict[str, float]]:
    """The rows of a run's log.csv up to a step, as numbers; [] when there is no log."""
    if not path.exists():
        return []
    with path.open() as f:
        try:
            rows = [{"world_size": 1.0, **{k: float(v) for k, v in row.items()}} for row in csv.DictReader(f)]
        except (ValueError, TypeError) as exc:  # a cell that is no number, or a row with too few cells
            raise UserInputError(f"{path} is not a training log: {exc}") from None
    return [row for row in rows if row["step"] <= up_to_step]


@torch.no_grad()
def accuracy(model: AUNN, idx: torch.Tensor, targets: torch.Tensor) -> float:
    return (model.predict(idx) == targets).float().mean().item() if idx.numel() else float("nan")


def check_data_fits(data: Dataset, cfg: AUNNConfig) -> None:
    """ValueError unless the data's indices 0 .. length-1 are all indices of a model with this config."""
    if data.length - 1 > cfg.max_index:
        raise UserInputError(f"the data's {data.length} indices do not fit in bits={cfg.bits} "
                             f"(largest valid index {cfg.max_index})")


def train(model: AUNN, data: Dataset, cfg: TrainConfig, run_dir: str | Path | None = None,
          resume: bool = False, progress: bool = True, reset_optimizer: bool = False) -> list[dict[str, float]]:
    """Train ``model`` on ``data``; returns the logged rows. Ctrl-C lets the step under way finish, then saves
    a checkpoint and raises KeyboardInterrupt (a second Ctrl-C interrupts at once).

    With ``run_dir``, writes ``log.csv`` and ``model.safetensors`` there (every ``save_every``
    steps and at the end, atomically), holding the directory's lock (:mod:`aunn_fast.runlock`:
    RunDirectoryBusy if another process writes there). ``resume`` continues from that checkpoint
    (``reset_optimizer``: with a fresh AdamW where its optimizer state is missing or unwanted).
    A non-finite loss or weight stops the run with TrainingDiverged, without saving it.

    In an initialized torch.distributed process group (torchrun), every rank calls this: each trains on its
    share of every global batch of ``cfg.batch_size`` (aunn_fast.distributed); rank 0 alone writes ``run_dir``
    (and holds its lock) and shows progress. The rows (global loss and accuracy) are the same on every rank, but
    only rank 0's begin with those of the log resumed.
    """
    if run_dir is None or distributed.rank_and_world_size()[0] != 0:  # rank 0 alone writes (and locks) run_dir
        return _train(model, data, cfg, None if run_dir is None else Path(run_dir), resume, progress,
                      reset_optimizer)
    with runlock.hold(run_dir, "aunn_fast.train.train()"):
        return _train(model, data, cfg, Path(run_dir), resume, progress, reset_optimizer)


def _train(model: AUNN, data: Dataset, cfg: TrainConfig, run_path: Path | None, resume: bool, progress: bool,
           reset_optimizer: bool) -> list[dict[str, float]]:
    check_data_fits(data, model.cfg)  # checked, like the backend's settings, before anything is written
    model.active_backend().check_settings()
    model.vocab, model.data_description = data.vocab, data.describe()
    optimizer = make_optimizer(model, cfg)
    start, elapsed_before = 0, 0.0
    if resume:
        if run_path is None:
            raise UserInputError("resume needs a run directory")
        saved, state, extra, metadata = load_run(run_path, model.device, reset_optimizer=reset_optimizer)
        model.load_params(saved.params._asdict())
        if reset_optimizer:
            print(f"warning: --reset-optimizer: AdamW restarts with zero moments at step {state['step']}; this run "
                  "will not reproduce the uninterrupted one", file=sys.stderr)
        else:
            restore_optimizer(optimizer, extra, metadata["optimizer_groups"])
        start, elapsed_before = int(state["step"]), float(state.get("elapsed_s", 0.0))
    total = cfg.total_steps(data.length)
    sampler = EpochSampler(data.length, cfg.batch_size, cfg.seed, model.device, *distributed.rank_and_world_size())
    if sampler.rank != 0:  # rank 0 alone writes the run directory and shows progress
        run_path, progress = None, False
    rows = read_log(run_path / LOG_NAME, start) if run_path else []
    if run_path is not None:  # the log is cut back to the checkpoint, or begun at the first row
        run_path.mkdir(parents=True, exist_ok=True)
        if resume:
            _write_log(run_path / LOG_NAME, rows)
        else:
            (run_path / LOG_NAME).unlink(missing_ok=True)

    with _ctrl_c_between_steps() as pressed:
        parallel = None
        if distributed.is_initialized():  # every rank stops after the same step, when any was interrupted
            parallel = distributed.DataParallel(model, optimizer, sampler, data, pressed)
            pressed = parallel.stop_agreed
        graphed = None
        if cfg.cuda_graph and model.device.type == "cuda" and parallel is None:
            graphed = GraphedTrainStep(model, optimizer, min(cfg.batch_size, data.length))
        step = start
        began, seen = time.perf_counter(), 0

        def elapsed() -> float:
            return elapsed_before + time.perf_counter() - began

        bar = tqdm(total=total, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
        watch = LossWatch(min(cfg.log_every, cfg.save_every), model.device, cfg.lr)
        try:
            while step < total:
                if pressed():
                    raise KeyboardInterrupt
                if parallel is not None:
                    idx, targets, loss = parallel.step(step)
                else:
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
                seen += sampler.global_batch_size(step)
                step += 1
                watch.record(step, loss)
                bar.update(1)
                if step % cfg.log_every == 0 or step % cfg.save_every == 0 or step == total:
                    watch.check()
                if step % cfg.log_every == 0 or step == total:
                    now = elapsed()
                    row = {"step": step, "epoch": step / sampler.steps_per_epoch, "loss": loss.item(),
                           "accuracy": accuracy(model, idx, targets) if parallel is None
                           else parallel.accuracy(idx, targets),
                           "indices_per_s": seen / max(now - elapsed_before, 1e-9), "elapsed_s": now,
                           "world_size": sampler.world_size}
                    rows.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}",
                                    idx_s=f"{row['indices_per_s']:.3g}")
                    if run_path is not None:
                        _write_log(run_path / LOG_NAME, [row], append=True)
                if run_path is not None and step % cfg.save_every == 0:
                    save_run(run_path, model, optimizer, step, cfg, elapsed(), sampler.world_size)
        except KeyboardInterrupt:
            watch.check()
            if run_path is not None:
                save_run(run_path, model, optimizer, step, cfg, elapsed(), sampler.world_size)
                bar.write(f"interrupted at step {step}; checkpoint saved to {run_path / CHECKPOINT_NAME}")
            raise
        finally:
            bar.close()
        if run_path is not None:
            save_run(run_path, model, optimizer, step, cfg, elapsed(), sampler.world_size)
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
    """Write rows to a new log (with its header, atomically), or append them (a new log if there is none yet).
    An append that fails (a full disk) is cut back, so the log never ends in half a row."""
    lines = [{k: (int(row[k]) if k in ("step", "world_size") else row[k]) for k in LOG_FIELDS} for row in rows]
    if not (append and path.exists()):
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
                writer.writeheader()
                writer.writerows(lines)

        atomic_write(path, write)
        return
    text = io.StringIO(newline="")
    csv.DictWriter(text, fieldnames=LOG_FIELDS).writerows(lines)
    data = text.getvalue().encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
