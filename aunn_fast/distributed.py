"""Data-parallel training across the processes torchrun starts: one run, one all-reduce per step.

``torchrun --nproc-per-node N -m aunn_fast train ...`` starts N processes (ranks) with
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. Each joins one process
group (NCCL on CUDA, one GPU per local rank; gloo on the CPU), holds a full replica of
the model and optimizer, and at every step computes the loss and gradients of its
contiguous share of the same global batch (:class:`~aunn_fast.sampler.EpochSampler`).
Its loss is the sum over its share divided by the *global* batch size, so the sum of the
ranks' gradients is the gradient of the global batch's mean loss, the one a single
process computes. One all-reduce (sum) per step carries, packed in one float32 buffer,
every gradient, the loss and one status slot per rank (running, interrupted by Ctrl-C,
failed); every rank then applies the same optimizer step, so the replicas stay equal.

The gradients are read from each parameter's ``.grad`` after ``backward()``, whatever
the backend computed them with, so no backend can skip the reduction (as a loss
computed outside torch's DistributedDataParallel wrapper would).

On CUDA with NCCL, a step of a full-size global batch is one captured CUDA graph
(:class:`~aunn_fast.cuda_graph.GraphedTrainStep`): forward, backward, packing, the
all-reduce, unpacking, clipping and the optimizer step, replayed by one launch. NCCL
collectives can be captured (NCCL >= 2.9.6; torch keeps them out of its watchdog while
capturing). Every rank captures at the same step and replays at the same steps, as NCCL
requires; where a rank cannot capture, every rank runs eagerly (:attr:`DataParallel.eager_reason`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .cuda_graph import GraphedTrainStep, capturable
from .data import Dataset
from .errors import UserInputError
from .model import AUNN
from .sampler import EpochSampler

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
NCCL_CAPTURE_VERSION = (2, 9, 6)  # the first NCCL whose collectives a CUDA graph can capture
RUNNING, INTERRUPTED, FAILED = 0, 1, 2  # a rank's status slot in the step's all-reduce
TIMEOUT = datetime.timedelta(minutes=30)  # a collective waiting longer than this for a rank fails


class RankFailed(RuntimeError):
    """Another rank failed during a step; every other rank stops at that step with this error."""


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int


def launch_from_env(environ: Mapping[str, str] = os.environ) -> Launch | None:
    """The torchrun launch this process belongs to, or None outside one (none of its variables set).

    Raises ValueError when only some of LAUNCH_VARIABLES are set, or they do not make sense.
    """
    present = [name for name in LAUNCH_VARIABLES if name in environ]
    if not present:
        return None
    missing = [name for name in LAUNCH_VARIABLES if name not in environ]
    if missing:
        raise UserInputError(
            f"{', '.join(present)} set but not {', '.join(missing)}: start data-parallel training "
            "with torchrun (or unset them)"
        )
    try:
        launch = Launch(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]))
    except ValueError:
        raise UserInputError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not (0 <= launch.rank < launch.world_size and 0 <= launch.local_rank <= launch.rank):
        raise UserInputError(
            f"inconsistent launch: RANK={launch.rank}, WORLD_SIZE={launch.world_size}, LOCAL_RANK={launch.local_rank}"
        )
    return launch


def rank_device(launch: Launch, device: str) -> str:
    """The device this rank trains on: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per local rank); ``cpu``
    stays. A ``cuda:N`` named explicitly is refused for more than one process (ValueError)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return device
    if device != "cuda" and launch.world_size > 1:
        raise UserInputError(
            f"--device {device}: under torchrun each rank takes the GPU of its local rank; "
            "pass --device cuda (choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if device != "cuda":
        return device
    if launch.local_rank >= torch.cuda.device_count():
        raise UserInputError(
            f"local rank {launch.local_rank} has no GPU: this machine has "
            f"{torch.cuda.device_count()}; start at most that many processes per node"
        )
    return f"cuda:{launch.local_rank}"


def init(launch: Launch, device: str) -> None:
    """Join the launch's process group: NCCL for a CUDA device, gloo for the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl", rank=launch.rank, world_size=launch.world_size, timeout=TIMEOUT, device_id=torch.device(device)
        )
    else:
        dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size, timeout=TIMEOUT)


@contextlib.contextmanager
def command_rank(args: argparse.Namespace) -> Iterator[None]:
    """Run an ``aunn`` command as one rank of a torchrun launch (a no-op outside one).

    Only ``train`` runs data-parallel. Joins the process group on the rank's device (``args.device``
    becomes it), and leaves it at the end. Ranks other than 0 write nothing to stdout and stderr while the
    command runs; an error raised in any rank still shows, after. A rank stopped because another failed
    says so in one line on stderr and exits with status 1 (SystemExit).
    """
    launch = launch_from_env()
    if launch is None:
        yield
        return
    if args.command != "train":
        raise UserInputError(f"only `aunn train` runs under torchrun; run `aunn {args.command}` as one process")
    args.device = rank_device(launch, args.device)
    init(launch, args.device)
    try:
        with open(os.devnull, "w") as devnull:
            silent = contextlib.ExitStack()
            if launch.rank != 0:
                silent.enter_context(contextlib.redirect_stdout(devnull))
                silent.enter_context(contextlib.redirect_stderr(devnull))
            with silent:
                yield
    except RankFailed as exc:
        print(f"aunn {args.command} (rank {launch.rank}): stopped: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        shutdown()


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of this process's group; (0, 1) outside one."""
    return (dist.get_rank(), dist.get_world_size()) if is_initialized() else (0, 1)


class DataParallel:
    """This rank's part of every step of a data-parallel run; the process group must be initialized.

    ``step(step) -> (idx, targets, loss)``: this rank's indices and targets (int64 [share])
    and the global batch's mean loss (float32 []), after the optimizer step. ``pressed()``
    says whether this rank was interrupted (Ctrl-C), asked just before the step's all-reduce;
    :meth:`stop_agreed` whether any rank was, as of the last step, so that every rank stops
    after the same step. ``clip_grad_norm``: the reduced gradient's total norm is clipped to it before the step.

    ``cuda_graph``: capture the step of a full-size global batch in a CUDA graph, all-reduce included,
    where the model is on CUDA, the process group is NCCL (>= 2.9.6) and the optimizer is capturable;
    :attr:`eager_reason` says why not otherwise (None when graphed, or when not asked). The capture is
    collective: every rank must construct its DataParallel at the same point. Call :meth:`release` before
    the process group is destroyed.
    """

    def __init__(
        self,
        model: AUNN,
        optimizer: torch.optim.Optimizer,
        sampler: EpochSampler,
        data: Dataset,
        pressed: Callable[[], bool],
        clip_grad_norm: float | None = None,
        cuda_graph: bool = False,
    ) -> None:
        self.rank, self.world_size = rank_and_world_size()
        if (sampler.rank, sampler.world_size) != (self.rank, self.world_size):
            raise ValueError(
                f"the sampler is for rank {sampler.rank} of {sampler.world_size}, "
                f"this process is rank {self.rank} of {self.world_size}"
            )
        self.model, self.optimizer, self.sampler, self.data, self.pressed = model, optimizer, sampler, data, pressed
        self.clip_grad_norm = clip_grad_norm
        self.params = list(model.parameters())
        sizes = [p.numel() for p in self.params]
        total = sum(sizes)
        # float32 [gradients..., loss, status of rank 0 .. world_size-1], all summed by one all-reduce
        self.buffer = torch.zeros(total + 1 + self.world_size, dtype=torch.float32, device=model.device)
        self.grad_views = [view.view_as(p) for view, p in zip(self.buffer[:total].split(sizes), self.params)]
        self.loss, self.status = self.buffer[total], self.buffer[total + 1 :]
        self.interrupted = False
        # a captured step copies these into its status slots: zeros but this rank's, set before each replay
        self.sent_statuses = torch.zeros(self.world_size, dtype=torch.float32, device=model.device)
        self.sent_status = RUNNING
        self.full_batch_size = sampler.global_batch_size(0)  # an epoch's first batch is a full one
        self.graphed: GraphedTrainStep | None = None
        self.eager_reason: str | None = None
        if cuda_graph:
            self.graphed, self.eager_reason = self._capture()

    def stop_agreed(self) -> bool:
        """Whether any rank was interrupted at the last step (the same answer on every rank)."""
        return self.interrupted

    def share_loss(self, idx: torch.Tensor, targets: torch.Tensor, global_batch_size: int) -> torch.Tensor:
        """This rank's share of the global batch's mean loss: its summed loss over global_batch_size."""
        return self.model.loss(idx, targets, reduction="sum") / global_batch_size

    def pack(self, idx: torch.Tensor, targets: torch.Tensor, global_batch_size: int) -> None:
        """Forward and backward of this rank's share; its gradients and loss, scaled by 1 / global_batch_size,
        into the buffer. ``idx``, ``targets``: int64 [share], possibly empty."""
        self.optimizer.zero_grad(set_to_none=False)
        loss = self.share_loss(idx, targets, global_batch_size)
        loss.backward()
        self._pack_gradients(loss)

    def _pack_gradients(self, loss: torch.Tensor) -> None:
        for p in self.params:
            if p.grad is None:  # a parameter the loss does not reach
                p.grad = torch.zeros_like(p)
        torch._foreach_copy_(self.grad_views, [p.grad for p in self.params])
        self.loss.copy_(loss.detach())

    def _unpack_gradients(self) -> None:
        torch._foreach_copy_([p.grad for p in self.params], self.grad_views)

    def _captured_reduction(self, loss: torch.Tensor) -> torch.Tensor:
        """What a captured step does between its backward pass and clipping: pack, all-reduce, unpack.
        Returns the buffer's loss slot (the global batch's mean loss once reduced)."""
        self._pack_gradients(loss)
        self.status.copy_(self.sent_statuses)
        dist.all_reduce(self.buffer)
        self._unpack_gradients()
        return self.loss

    def _capture(self) -> tuple[GraphedTrainStep | None, str | None]:
        """The captured step of a full-size global batch, or None and why not. Where some rank could not
        capture, no rank keeps its graph (an all-reduce agrees on it), as NCCL needs every rank to replay."""
        first, end = self.sampler.share(0)
        reason = self._graph_unsupported(end - first)
        graphed = None
        if reason is None:
            try:
                graphed = GraphedTrainStep(
                    self.model,
                    self.optimizer,
                    end - first,
                    self.clip_grad_norm,
                    loss_fn=lambda idx, targets: self.share_loss(idx, targets, self.full_batch_size),
                    reduce=self._captured_reduction,
                )
            except Exception as exc:  # any failed capture falls back to eager steps, said below
                reason = f"the capture failed on rank {self.rank}: {type(exc).__name__}: {exc}"
        if self.model.device.type == "cuda" and dist.get_backend() == "nccl":
            captured = torch.tensor([0.0 if graphed is None else 1.0], device=self.model.device)
            dist.all_reduce(captured, op=dist.ReduceOp.MIN)
            if graphed is not None and captured.item() < 1:
                graphed.release()
                graphed, reason = None, "another rank could not capture its step"
            if reason is not None and capturable(self.optimizer):  # asked for, possible on paper, and failed
                warnings.warn(f"data-parallel steps run eagerly, not from a CUDA graph: {reason}", stacklevel=3)
        return graphed, reason

    def _graph_unsupported(self, share: int) -> str | None:
        """Why a step cannot be captured here, or None."""
        if self.model.device.type != "cuda":
            return "the model is not on CUDA"
        if dist.get_backend() != "nccl":
            return f"the process group's backend is {dist.get_backend()}, not NCCL"
        if not capturable(self.optimizer):
            return "the optimizer is not capturable (create it with capturable=True)"
        version = torch.cuda.nccl.version()
        if version < NCCL_CAPTURE_VERSION:
            return f"NCCL {'.'.join(map(str, version))} cannot capture collectives (2.9.6 can)"
        if share == 0:
            return f"a full batch of {self.full_batch_size} leaves rank {self.rank} no indices"
        return None

    def release(self) -> None:
        """Free the captured step, if any (before the process group is destroyed); later steps run eagerly."""
        if self.graphed is not None:
            self.graphed.release()
            self.graphed = None

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        error = None
        idx = targets = torch.empty(0, dtype=torch.int64, device=self.model.device)
        graphed = self.graphed if self.sampler.global_batch_size(step) == self.full_batch_size else None
        try:
            idx = self.sampler.indices(step)
            targets = self.data.targets(idx)
            if graphed is not None:
                graphed.load(idx, targets)
            else:
                self.pack(idx, targets, self.sampler.global_batch_size(step))
        except Exception as exc:  # told to every rank by the all-reduce below, then raised here
            error = exc
        status = FAILED if error is not None else INTERRUPTED if self.pressed() else RUNNING
        if graphed is not None:
            # every rank replays, a failed one too (on the inputs it last loaded): the graph's all-reduce must
            # meet its peers. Its optimizer step is then applied in memory, but the run stops below, unsaved.
            self._send_status(status)
            graphed.replay()
        else:
            self.status.zero_()
            self.status[self.rank] = status
            dist.all_reduce(self.buffer)
        statuses = [round(s) for s in self.status.tolist()]
        if error is not None:
            raise error
        failed = [rank for rank, s in enumerate(statuses) if s == FAILED]
        if failed:
            who = f"rank {failed[0]}" if len(failed) == 1 else f"ranks {', '.join(map(str, failed))}"
            raise RankFailed(
                f"{who} failed in step {step + 1} (the error is in its output); every rank stopped "
                f"there, and the run directory keeps its last checkpoint"
            )
        self.interrupted = INTERRUPTED in statuses
        if graphed is None:
            self._unpack_gradients()
            if self.clip_grad_norm is not None:  # of the global gradient, the same on every rank
                torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)
            self.optimizer.step()
        return idx, targets, self.loss.clone()

    def _send_status(self, status: int) -> None:
        """Set the status slot the next replay sends (a device write only when it changes)."""
        if status != self.sent_status:
            self.sent_statuses[self.rank].fill_(status)
            self.sent_status = status

    @torch.no_grad()
    def accuracy(self, idx: torch.Tensor, targets: torch.Tensor) -> float:
        """The fraction of the global batch predicted right, from every rank's share (a collective)."""
        counts = torch.zeros(2, dtype=torch.float64, device=self.model.device)
        if idx.numel():
            counts[0] = (self.model.predict(idx) == targets).sum()
            counts[1] = idx.numel()
        dist.all_reduce(counts)
        correct, total = counts.tolist()
        return correct / total if total else float("nan")
