"""The workloads: what one timed call does, and the inputs it rotates through.

Every workload turns a configured :class:`~aunn_fast.AUNN` (backend, precision and
``validate=False`` already set) and a batch size into a :class:`Prepared`: a
zero-argument ``step`` that runs one call on the next of several random input
sets (so caches do not flatter), plus the inputs the correctness check uses.
Indices are int64 [batch] drawn uniformly from the model's whole index range;
targets are int64 [batch] in [0, vocab).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from aunn_fast import AUNN, AUNNConfig
from aunn_fast.cpp_backend import fused_adamw_step
from aunn_fast.cuda_graph import GraphedTrainStep
from aunn_fast.inference import optimizer_step
from aunn_fast.train import TrainConfig, training_optimizer

MAX_INPUT_SETS = 4
CONDITION_LR = 1e-2  # SGD's, for the conditioning workloads
INPUT_BYTES_BUDGET = 1 << 30  # all rotated index + target sets together

# The seed's run: 100,000 chunks of 4 indices, batch 2048, 500 epochs.
SEED_RUN_INDICES = 100_000 * 4
SEED_RUN_BATCH = 2048
SEED_RUN_EPOCHS = 500
SEED_RUN_STEPS = math.ceil(SEED_RUN_INDICES / SEED_RUN_BATCH) * SEED_RUN_EPOCHS  # 196 * 500 = 98,000


@dataclass(frozen=True)
class Prepared:
    """A ready workload: ``step()`` runs one timed call; ``idx``/``targets`` (int64 [batch]) feed the check.

    ``short_step`` (seed-run): the epoch's last, shorter step, timed apart for the projection.
    """

    step: Callable[[], object]
    idx: torch.Tensor
    targets: torch.Tensor
    short_step: Callable[[], object] | None = None


@dataclass(frozen=True)
class Workload:
    """One kind of work.

    check:   what the correctness check compares: "logits", "loss", or "steps" (the workload's own step
             replayed on the provider and the reference: gradients and parameter changes).
    ceiling: which hardware ceiling its throughput is compared to ("forward", "train" or None).
    fixed_batches: batch sizes that define the workload (empty: taken from the sweep).
    stretch: timed as a run of consecutive steps (ms/step) instead of a median of single calls.
    latency: timed as the wall-clock median of single synchronized calls (host time included, as a
             user waiting for the answer sees it) instead of device time.
    sweep: the workload whose batch sweep this one shares (None: its own).
    cuda_only: skipped, with that reason, on other devices.
    """

    name: str
    description: str
    check: str
    ceiling: str | None
    prepare: Callable[[AUNN, int, torch.Generator], Prepared]
    fixed_batches: tuple[int, ...] = ()
    stretch: bool = False
    latency: bool = False
    sweep: str | None = None
    cuda_only: bool = False


def random_model_indices(cfg: AUNNConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """int64 [n], uniform over [0, max_index) on the generator's device."""
    return torch.randint(0, cfg.max_index, (n,), generator=generator, device=generator.device, dtype=torch.int64)


def random_targets(cfg: AUNNConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """int64 [n], uniform over the vocabulary."""
    return torch.randint(0, cfg.vocab_size, (n,), generator=generator, device=generator.device, dtype=torch.int64)


def input_sets(cfg: AUNNConfig, batch: int, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to MAX_INPUT_SETS (indices, targets) pairs of int64 [batch], within INPUT_BYTES_BUDGET."""
    count = max(1, min(MAX_INPUT_SETS, INPUT_BYTES_BUDGET // (16 * batch)))
    return [(random_model_indices(cfg, batch, generator), random_targets(cfg, batch, generator)) for _ in range(count)]


def _rotating(
    model: AUNN, batch: int, generator: torch.Generator, call: Callable[[torch.Tensor, torch.Tensor], object]
) -> Prepared:
    sets = input_sets(model.cfg, batch, generator)
    cycle = itertools.cycle(sets)

    def step() -> object:
        idx, targets = next(cycle)
        return call(idx, targets)

    return Prepared(step, *sets[0])


def benchmark_optimizer(model: AUNN, kind: str) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) for training, plain SGD for conditioning on a prompt."""
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=model.device.type == "cuda")
    return torch.optim.SGD(model.parameters(), lr=CONDITION_LR)


def _training_call(model: AUNN, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor, torch.Tensor], object]:
    """One training step as `aunn train` takes it: on the cpp backend one C++ call (forward, loss, backward and
    the AdamW update: `fused_adamw_step`), elsewhere eager autograd and the optimizer's own step."""
    fused = fused_adamw_step(model, optimizer, max_norm=None)
    if fused is not None:
        return fused

    def call(idx: torch.Tensor, targets: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        model.loss(idx, targets).backward()
        optimizer.step()

    return call


def _prepare_predict(model: AUNN, batch: int, generator: torch.Generator) -> Prepared:
    return _rotating(model, batch, generator, lambda idx, targets: model.predict(idx))


def _prepare_loss(model: AUNN, batch: int, generator: torch.Generator) -> Prepared:
    def call(idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.loss(idx, targets)

    return _rotating(model, batch, generator, call)


def _prepare_train(model: AUNN, batch: int, generator: torch.Generator) -> Prepared:
    return _rotating(model, batch, generator, _training_call(model, benchmark_optimizer(model, "adamw")))


def _prepare_train_graph(model: AUNN, batch: int, generator: torch.Generator) -> Prepared:
    """The training step as `aunn train` runs it on CUDA: one captured graph, replayed."""
    optimizer = training_optimizer(model, TrainConfig(lr=1e-3))  # the trainer's own: fused, capturable
    return _rotating(model, batch, generator, GraphedTrainStep(model, optimizer, batch))


def _prepare_condition(model: AUNN, batch: int, generator: torch.Generator) -> Prepared:
    """The conditioning step as `aunn condition` runs it below inference.GRAPH_MIN_STEPS steps: eager, or one
    C++ call with the cpp backend."""
    return _rotating(model, batch, generator, optimizer_step(model, "sgd", CONDITION_LR, batch, total_steps=1))


def _prepare_condition_graph(model: AUNN, batch: int, generator: torch.Generator) -> Prepared:
    """The conditioning step as `aunn condition` runs it on CUDA from inference.GRAPH_MIN_STEPS steps on:
    replayed from one captured graph."""
    return _rotating(model, batch, generator, GraphedTrainStep(model, benchmark_optimizer(model, "sgd"), batch))


def seed_run_seconds(batch: int, step_ms: float, short_step_ms: float | None) -> float:
    """The seed's run in seconds: SEED_RUN_EPOCHS epochs of full steps and, where the batch does not
    divide the data, one shorter step."""
    full_steps, rest = divmod(SEED_RUN_INDICES, batch)
    if rest and short_step_ms is None:
        raise ValueError(f"at batch {batch} each epoch ends with a short step of {rest}: its time is needed")
    return SEED_RUN_EPOCHS * (full_steps * step_ms + (short_step_ms if rest else 0.0)) / 1e3


def _seed_run(
    model: AUNN,
    batch: int,
    generator: torch.Generator,
    call: Callable[[torch.Tensor, torch.Tensor], object],
    short_call: Callable[[torch.Tensor, torch.Tensor], object],
) -> Prepared:
    """Walk a shuffled epoch of the seed's 400,000 indices in full batches, gathering each batch; the
    indices left over (640 at batch 2048) make the epoch's short step."""
    order = torch.randperm(SEED_RUN_INDICES, generator=generator, device=generator.device)
    data = random_targets(model.cfg, SEED_RUN_INDICES, generator)
    full_steps, rest = divmod(SEED_RUN_INDICES, batch)
    starts = itertools.cycle(range(0, full_steps * batch, batch))

    def step() -> None:
        idx = order[next(starts) :][:batch]
        call(idx, data[idx])

    def short_step() -> None:
        idx = order[full_steps * batch :]
        short_call(idx, data[idx])

    first = order[:batch]
    return Prepared(step, first, data[first], short_step if rest else None)


def _prepare_seed_run(model: AUNN, batch: int, generator: torch.Generator) -> Prepared:
    call = _training_call(model, benchmark_optimizer(model, "adamw"))
    return _seed_run(model, batch, generator, call, call)


def _prepare_seed_run_graph(model: AUNN, batch: int, generator: torch.Generator) -> Prepared:
    """The seed's run as `aunn train` runs it on CUDA: each full batch through one captured step, the
    short one eagerly (zeroing the gradients the graph holds instead of freeing them)."""
    optimizer = training_optimizer(model, TrainConfig(lr=1e-3))  # the trainer's own: fused, capturable
    graphed = GraphedTrainStep(model, optimizer, batch)

    def short_call(idx: torch.Tensor, targets: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=False)
        model.loss(idx, targets).backward()
        optimizer.step()

    return _seed_run(model, batch, generator, graphed, short_call)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("predict", "forward + argmax", "logits", "forward", _prepare_predict),
        Workload("loss", "forward + cross-entropy (no grad)", "loss", "forward", _prepare_loss),
        Workload("train", "forward + loss + backward + AdamW step", "steps", "train", _prepare_train),
        Workload(
            "train-graph",
            "the train step replayed from one CUDA graph, as `aunn train` runs it",
            "steps",
            "train",
            _prepare_train_graph,
            sweep="train",
            cuda_only=True,
        ),
        Workload(
            "condition",
            "prompt of 2 / 64 indices: forward + backward + SGD step",
            "steps",
            None,
            _prepare_condition,
            fixed_batches=(2, 64),
            latency=True,
        ),
        Workload(
            "condition-graph",
            "the conditioning step replayed from one CUDA graph, as `aunn condition` runs 8 steps or more",
            "steps",
            None,
            _prepare_condition_graph,
            fixed_batches=(2, 64),
            latency=True,
            cuda_only=True,
        ),
        Workload(
            "seed-run",
            f"the seed's run: {SEED_RUN_STEPS:,} train steps of {SEED_RUN_BATCH}, extrapolated from a measured stretch",
            "steps",
            "train",
            _prepare_seed_run,
            fixed_batches=(SEED_RUN_BATCH,),
            stretch=True,
        ),
        Workload(
            "seed-run-graph",
            "the seed's run with each step replayed from one CUDA graph, as `aunn train` runs it",
            "steps",
            "train",
            _prepare_seed_run_graph,
            fixed_batches=(SEED_RUN_BATCH,),
            stretch=True,
            cuda_only=True,
        ),
    )
}
