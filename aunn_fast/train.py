"""Training loop: AdamW with a learning-rate schedule over shuffled index batches, logged, checkpointed, resumable.

The batch at every step is a pure function of (seed, step), and so is the default learning rate
(:mod:`aunn_fast.schedule`), so a resumed run sees exactly the batches and rates the uninterrupted
run would have seen; with the optimizer and scheduler state restored from the checkpoint, a
resumed CPU run reproduces the same losses. A caller may hand in its own optimizer, scheduler
and callbacks (:mod:`aunn_fast.callbacks`); the defaults are built and driven the same way.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from . import checkpoint, distributed, runlock
from .atomic import atomic_write
from .callbacks import Callback, StopAtAccuracy
from .config import AUNNConfig
from .cpp_backend import fused_adamw_step
from .cuda_graph import GraphedTrainStep, capturable
from .data import Dataset, uniform_indices
from .divergence import LossWatch, check_finite
from .errors import CheckpointError, UserInputError, UserTypeError
from .model import AUNN
from .sampler import EpochSampler, focus_indices
from .schedule import SCHEDULES, StepSchedule, lr_at

CHECKPOINT_NAME = "model.safetensors"
LOG_NAME = "log.csv"
LOG_FIELDS = [
    "step",
    "epoch",
    "loss",
    "accuracy",
    "lr",
    "full_accuracy",
    "full_accuracy_indices",
    "indices_per_s",
    "elapsed_s",
    "world_size",
]
MAX_STEPS = 2**53  # steps (and epochs, as their ratio) stay exact in a float64
MAX_SEED = 2**63 - 1
FULL_PASS_LIMIT = 1 << 18  # --eval-every scores every index up to this length, above it a fixed sample of this size
PREDICT_CHUNK = 1 << 16


@dataclass
class TrainConfig:
    """How to train. Exactly one of ``epochs`` and ``steps`` sets the length (steps wins).

    The learning rate warms up over ``warmup_steps`` to ``lr``, then ``schedule`` ("cosine", "linear" or
    "constant") takes it to ``min_lr`` at the last step (:func:`aunn_fast.schedule.lr_at`); the gradients'
    total norm is clipped to ``clip_grad_norm`` before every optimizer step. ``eval_every``
    (0: never) measures the accuracy over the whole training data (above FULL_PASS_LIMIT indices, a fixed
    sample of that many) every so many steps and at the last; ``target_accuracy`` stops the run at the first
    such measurement that reaches it. ``focus`` (0: off) adds ceil(focus * batch_size) more indices to every
    step after a full-pass measurement, drawn from the indices that measurement predicted wrong
    (:func:`aunn_fast.sampler.focus_indices`), so that the model sees what it still gets wrong more often
    than once an epoch; it needs ``eval_every`` and one process (no torchrun).
    """

    batch_size: int = 2048
    epochs: float = 200.0
    steps: int | None = None
    lr: float = 1e-2
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr: float = 0.0
    clip_grad_norm: float | None = 1.0  # the gradients' total norm is cut to this before every step (None: never)
    seed: int = 0
    log_every: int = 50
    save_every: int = 2000
    eval_every: int = 0
    target_accuracy: float | None = None
    focus: float = 0.0
    cuda_graph: bool = True  # on CUDA, replay full-size steps from one captured graph

    def __post_init__(self) -> None:
        """UserTypeError/UserInputError (TypeError/ValueError) for a field of the wrong type or range."""
        for name in ("batch_size", "log_every", "save_every", "seed", *(("steps",) if self.steps is not None else ())):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserTypeError(f"TrainConfig.{name} must be an int, got {type(value).__name__} {value!r}")
        for name in ("epochs", "lr", "weight_decay", "focus"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise UserTypeError(f"TrainConfig.{name} must be a number, got {type(value).__name__} {value!r}")
        if not isinstance(self.cuda_graph, bool):
            raise UserTypeError(f"TrainConfig.cuda_graph must be a bool, got {type(self.cuda_graph).__name__}")
        for name in ("batch_size", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise UserInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.steps is not None and not 0 <= self.steps <= MAX_STEPS:
            raise UserInputError(f"steps must be in 0..2**53, got {self.steps}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserInputError(f"seed must be in 0..2**63-1, got {self.seed}")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise UserInputError(f"epochs must be a finite number > 0, got {self.epochs}")
        for name in ("lr", "weight_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UserInputError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise UserInputError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise UserInputError(f"need 0 <= min_lr <= lr (finite), got min_lr {self.min_lr} and lr {self.lr}")
        if self.clip_grad_norm is not None and not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise UserInputError(f"clip_grad_norm must be a finite number > 0 or None, got {self.clip_grad_norm}")
        if not 0 <= self.focus <= 1:
            raise UserInputError(f"focus must be in [0, 1] (a share of the batch), got {self.focus}")
        if self.focus and not self.eval_every:
            raise UserInputError("focus needs eval_every: the indices it adds are those a full pass found wrong")
        if self.target_accuracy is not None:
            if not 0 < self.target_accuracy <= 1:
                raise UserInputError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")
            if not self.eval_every:
                raise UserInputError("target_accuracy needs eval_every: the run stops on a full-pass accuracy")

    def total_steps(self, length: int) -> int:
        """The run's length in steps; UserInputError if epochs over this data make more than 2**53."""
        if self.steps is not None:
            return self.steps
        steps = self.epochs * self.steps_per_epoch(length)
        if not steps <= MAX_STEPS:
            raise UserInputError(
                f"epochs={self.epochs:g} over {length:,} indices in batches of {self.batch_size} "
                f"make {steps:.3g} steps, more than a run can take (2**53)"
            )
        return max(1, math.ceil(steps))

    def steps_per_epoch(self, length: int) -> int:
        return max(1, math.ceil(length / self.batch_size))

    def focus_size(self) -> int:
        """Indices each step adds from the ones last predicted wrong (``focus`` of the batch, rounded up)."""
        return math.ceil(self.focus * self.batch_size)

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) of a ``total``-step run."""
        return lr_at(step, total, self.lr, self.warmup_steps, self.schedule, self.min_lr)


def training_optimizer(model: AUNN, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; on CUDA fused, and capturable (so it can live in a CUDA graph) when cfg.cuda_graph, its learning
    rate then a device tensor, which the graph reads at every replay (so that a schedule can change it)."""
    on_cuda = model.device.type == "cuda"
    graphed = on_cuda and cfg.cuda_graph
    lr = torch.tensor(cfg.lr, device=model.device) if graphed else cfg.lr
    return torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=on_cuda, capturable=graphed
    )


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> StepSchedule:
    """cfg's warm-up and decay over a ``total``-step run, for ``optimizer``."""
    return StepSchedule(optimizer, lambda step: cfg.lr_at(step, total))


def _json(value: object) -> str:
    """JSON, with tensors (say a tensor learning rate) as their numbers."""
    return json.dumps(value, default=lambda v: v.tolist() if torch.is_tensor(v) else repr(v))


def set_lr(optimizer: torch.optim.Optimizer, rates: Sequence[float]) -> None:
    """Give each param group its learning rate, in place where it is a tensor (a captured graph reads it)."""
    for group, rate in zip(optimizer.param_groups, rates):
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """Optimizer state as flat named tensors plus its param groups as JSON, for safetensors."""
    state = optimizer.state_dict()
    tensors = {
        f"optim.{pid}.{key}": value if torch.is_tensor(value) else torch.tensor(value)
        for pid, entry in state["state"].items()
        for key, value in entry.items()
    }
    return tensors, _json(state["param_groups"])


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


def save_run(
    run_dir: Path,
    model: AUNN,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    step: int,
    cfg: TrainConfig,
    elapsed_s: float,
    world_size: int = 1,
) -> None:
    """Checkpoint a run: the model, the optimizer and scheduler state, the step reached, the training time so far
    and the number of processes it ran with. TrainingDiverged, and nothing written, if a weight or an optimizer
    moment is not finite."""
    tensors, groups = optimizer_tensors(optimizer)
    check_finite([*model.named_parameters(), *tensors.items()], step, cfg.lr)
    model.save(
        run_dir / CHECKPOINT_NAME,
        extra=tensors,
        extra_metadata={
            "optimizer_groups": groups,
            "scheduler": _json(scheduler.state_dict()),
            "train_state": json.dumps(
                {"step": step, "elapsed_s": elapsed_s, "train_config": asdict(cfg), "world_size": world_size}
            ),
        },
    )


def load_run(
    run_dir: Path,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    precision: str = "auto",
    reset_optimizer: bool = False,
) -> tuple[AUNN, dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """The model of a run directory, its training state, its extra tensors and its metadata.

    Raises CheckpointError (a ValueError) for a checkpoint without training state (one not written by
    :func:`train`), or past step 0 without its optimizer state unless ``reset_optimizer``.
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    ckpt = checkpoint.load(path, device)
    if ckpt.train_state is None or ckpt.optimizer_groups is None:
        raise CheckpointError(
            path,
            "train_state",
            "absent: the file holds a model but no training state (step, "
            "optimizer), so its run cannot be resumed; was it saved by "
            "`aunn condition --save`?",
        )
    step = ckpt.train_state["step"]
    if step > 0 and not ckpt.has_optimizer_state and not reset_optimizer:
        raise CheckpointError(
            path,
            "extra.optim",
            f"the optimizer state of step {step} is missing, so the run "
            "cannot continue exactly; --reset-optimizer (reset_optimizer=True) "
            "continues with a fresh AdamW",
        )
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
def mistakes(model: AUNN, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """bool [N]: where the argmax prediction at idx (int64 [N]) is not its target (int64 [N])."""
    if not idx.numel():
        return torch.zeros(0, dtype=torch.bool, device=idx.device)
    return torch.cat(
        [
            model.predict(chunk) != target
            for chunk, target in zip(idx.split(PREDICT_CHUNK), targets.split(PREDICT_CHUNK))
        ]
    )


def accuracy(model: AUNN, idx: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of idx (int64 [N]) whose argmax prediction is its target (int64 [N]); NaN for N = 0."""
    if not idx.numel():
        return float("nan")
    return (idx.numel() - int(mistakes(model, idx, targets).sum())) / idx.numel()


def full_pass_indices(length: int, seed: int, device: torch.device) -> torch.Tensor:
    """int64 indices the full-pass accuracy scores: all of 0 .. length-1 up to FULL_PASS_LIMIT, else a fixed
    uniform sample of FULL_PASS_LIMIT of them (the same for every measurement of a run)."""
    if length <= FULL_PASS_LIMIT:
        return torch.arange(length, dtype=torch.int64, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return uniform_indices(length, FULL_PASS_LIMIT, generator)


def check_data_fits(data: Dataset, cfg: AUNNConfig) -> None:
    """ValueError unless the data's indices 0 .. length-1 are all indices of a model with this config."""
    if data.length - 1 > cfg.max_index:
        raise UserInputError(
            f"the data's {data.length} indices do not fit in bits={cfg.bits} (largest valid index {cfg.max_index})"
        )


def train(
    model: AUNN,
    data: Dataset,
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    reset_optimizer: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    callbacks: Sequence[Callback] = (),
) -> list[dict[str, float]]:
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
    only rank 0's begin with those of the log resumed. On CUDA (NCCL) with ``cfg.cuda_graph``, each full-size
    step replays one captured graph that holds the gradients' all-reduce too.

    ``optimizer`` (default :func:`training_optimizer`, AdamW) must hold the model's parameters; ``scheduler``
    (default :func:`make_scheduler`, cfg's warm-up and decay; any ``LRScheduler`` whose ``step()`` takes no
    argument) is stepped after every optimizer step, and the log's lr is its first group's. Both are
    checkpointed (``state_dict``) and restored on ``resume``; a caller's optimizer on CUDA runs eagerly unless
    it is capturable. Each of ``callbacks`` sees every logged row (:class:`aunn_fast.callbacks.Callback`) and
    may stop the run; ``cfg.target_accuracy`` adds a :class:`~aunn_fast.callbacks.StopAtAccuracy`. Under
    torchrun every rank's callbacks see the same rows: a callback that writes should do so on rank 0 only.
    """
    options = dict(
        resume=resume,
        progress=progress,
        reset_optimizer=reset_optimizer,
        optimizer=optimizer,
        scheduler=scheduler,
        callbacks=callbacks,
    )
    if run_dir is None or distributed.rank_and_world_size()[0] != 0:  # rank 0 alone writes (and locks) run_dir
        return _train(model, data, cfg, None if run_dir is None else Path(run_dir), **options)
    with runlock.hold(run_dir, "aunn_fast.train.train()"):
        return _train(model, data, cfg, Path(run_dir), **options)


def _train(
    model: AUNN,
    data: Dataset,
    cfg: TrainConfig,
    run_path: Path | None,
    *,
    resume: bool,
    progress: bool,
    reset_optimizer: bool,
    optimizer: torch.optim.Optimizer | None,
    scheduler: LRScheduler | None,
    callbacks: Sequence[Callback],
) -> list[dict[str, float]]:
    check_data_fits(data, model.cfg)  # checked, like the backend's settings, before anything is written
    model.active_backend().check_settings()
    model.vocab, model.data_description = data.vocab, data.describe()
    total = cfg.total_steps(data.length)
    optimizer = optimizer if optimizer is not None else training_optimizer(model, cfg)
    scheduler = scheduler if scheduler is not None else make_scheduler(optimizer, cfg, total)
    callbacks = [*callbacks, *([StopAtAccuracy(cfg.target_accuracy)] if cfg.target_accuracy is not None else [])]
    start, elapsed_before = 0, 0.0
    if resume:
        if run_path is None:
            raise UserInputError("resume needs a run directory")
        saved, state, extra, metadata = load_run(run_path, model.device, reset_optimizer=reset_optimizer)
        model.load_params(saved.params._asdict())
        if reset_optimizer:
            print(
                f"warning: --reset-optimizer: AdamW restarts with zero moments at step {state['step']}; this run "
                "will not reproduce the uninterrupted one",
                file=sys.stderr,
            )
        else:
            restore_optimizer(optimizer, extra, metadata["optimizer_groups"])
        start, elapsed_before = int(state["step"]), float(state.get("elapsed_s", 0.0))
        # a checkpoint from before schedules were saved: the schedule moved to its step
        saved_schedule = json.loads(metadata.get("scheduler", "null"))
        scheduler.load_state_dict(saved_schedule or {**scheduler.state_dict(), "last_epoch": start})
        set_lr(optimizer, scheduler.get_last_lr())
    sampler = EpochSampler(data.length, cfg.batch_size, cfg.seed, model.device, *distributed.rank_and_world_size())
    if sampler.rank != 0:  # rank 0 alone writes the run directory and shows progress
        run_path, progress = None, False
    scored = full_pass_indices(data.length, cfg.seed, model.device) if cfg.eval_every else None
    if cfg.focus and sampler.world_size > 1:
        raise UserInputError("focus trains one process only: under torchrun, leave it at 0")
    # the indices the last full pass found wrong (TrainConfig.focus); a resumed run finds them again
    focus_on = _wrong(model, data, scored) if cfg.focus and scored is not None and start >= cfg.eval_every else None
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
            parallel = distributed.DataParallel(
                model, optimizer, sampler, data, pressed, cfg.clip_grad_norm, cuda_graph=cfg.cuda_graph
            )
            pressed = parallel.stop_agreed
        graphed = None
        if cfg.cuda_graph and model.device.type == "cuda" and capturable(optimizer) and parallel is None:
            graphed = GraphedTrainStep(model, optimizer, min(cfg.batch_size, data.length), cfg.clip_grad_norm)
        fused = fused_adamw_step(model, optimizer, cfg.clip_grad_norm) if parallel is None else None
        step = start
        began, seen = time.perf_counter(), 0

        def elapsed() -> float:
            return elapsed_before + time.perf_counter() - began

        def save() -> None:
            if run_path is not None:
                save_run(run_path, model, optimizer, scheduler, step, cfg, elapsed(), sampler.world_size)

        bar = tqdm(total=total, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
        watch = LossWatch(min(cfg.log_every, cfg.save_every), model.device, cfg.lr)
        try:
            stop = False
            while step < total and not stop:
                if pressed():
                    raise KeyboardInterrupt
                lr = scheduler.get_last_lr()[0]  # this step's (read as a number only when logged: no sync)
                if parallel is not None:
                    idx, targets, loss = parallel.step(step)
                else:
                    idx = sampler.indices(step)
                    if focus_on is not None:
                        idx = torch.cat([idx, focus_indices(focus_on, step, cfg.focus_size())])
                    targets = data.targets(idx)
                    if graphed is not None and idx.numel() == graphed.batch_size:
                        loss = graphed(idx, targets)
                    elif fused is not None:
                        loss = fused(idx, targets)
                    else:
                        # a captured graph keeps using the gradient tensors it was captured with: zero, not free
                        optimizer.zero_grad(set_to_none=graphed is None)
                        loss = model.loss(idx, targets)
                        loss.backward()
                        if cfg.clip_grad_norm is not None:
                            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                        optimizer.step()
                scheduler.step()
                seen += sampler.global_batch_size(step) if parallel is not None else idx.numel()
                step += 1
                watch.record(step, loss)
                bar.update(1)
                if step % cfg.log_every == 0 or step % cfg.save_every == 0 or step == total:
                    watch.check()
                evaluated = scored is not None and (step % cfg.eval_every == 0 or step == total)
                if step % cfg.log_every == 0 or step == total or evaluated:
                    now = elapsed()
                    row = {
                        "step": step,
                        "epoch": step / sampler.steps_per_epoch,
                        "loss": loss.item(),
                        "accuracy": accuracy(model, idx, targets)
                        if parallel is None
                        else parallel.accuracy(idx, targets),
                        "lr": float(lr),
                        "full_accuracy": float("nan"),
                        "full_accuracy_indices": 0,
                        "indices_per_s": seen / max(now - elapsed_before, 1e-9),
                        "elapsed_s": now,
                        "world_size": sampler.world_size,
                    }
                    if evaluated:
                        assert scored is not None
                        wrong = _wrong(model, data, scored)
                        row["full_accuracy"] = (scored.numel() - wrong.numel()) / scored.numel()
                        focus_on = wrong if cfg.focus else None
                        row["full_accuracy_indices"] = scored.numel()
                    rows.append(row)
                    bar.set_postfix(_postfix(row, rows))
                    if run_path is not None:
                        _write_log(run_path / LOG_NAME, [row], append=True)
                    stop = any([bool(callback.on_log(row)) for callback in callbacks])  # every callback sees it
                if step % cfg.save_every == 0 and not stop:  # a stopped run is saved below, as a finished one
                    save()
        except KeyboardInterrupt:
            watch.check()
            save()
            if run_path is not None:
                bar.write(f"interrupted at step {step}; checkpoint saved to {run_path / CHECKPOINT_NAME}")
            raise
        finally:
            bar.close()
            if parallel is not None:  # a graph holding an NCCL all-reduce would hang the group's shutdown
                parallel.release()
        watch.check()
        save()
    for callback in callbacks:
        callback.on_end(rows)
    return rows


def _wrong(model: AUNN, data: Dataset, scored: torch.Tensor) -> torch.Tensor:
    """int64 [...]: the indices of ``scored`` whose argmax prediction is not the data's token."""
    return scored[mistakes(model, scored, data.targets(scored))]


def _postfix(row: dict[str, float], rows: list[dict[str, float]]) -> dict[str, str]:
    """The progress bar's figures: the latest row's, and the latest full-pass accuracy measured."""
    shown = {"loss": f"{row['loss']:.4f}", "acc": f"{row['accuracy']:.3f}", "lr": f"{row['lr']:.2e}"}
    full = [r["full_accuracy"] for r in rows if not math.isnan(r["full_accuracy"])]
    if full:
        shown["full_acc"] = f"{full[-1]:.4f}"
    shown["idx_s"] = f"{row['indices_per_s']:.3g}"
    return shown


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
    lines = [{k: _cell(row, k) for k in LOG_FIELDS} for row in rows]
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


def _cell(row: dict[str, float], field: str) -> float | int:
    """A row's value of a log column: a count as an int; NaN for a column an older log lacked."""
    value = row.get(field, math.nan)
    counts = ("step", "full_accuracy_indices", "world_size")
    return int(value) if field in counts and not math.isnan(value) else value
