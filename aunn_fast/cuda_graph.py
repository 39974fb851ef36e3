"""A whole training step (forward, loss, backward, optimizer step) captured in one CUDA graph.

At batch 8,192 an eager step is a few hundred kernel launches (2.3 ms on an H100 against 0.10 ms
replayed, bench/results/h100-2026-11-27-lease2/); replaying a captured graph removes that launch floor.
Capture needs static shapes and no host syncs: the batch size is fixed, the model's
range checks are switched off inside the graph (the caller validates), and the
optimizer must be capturable. A data-parallel step (:mod:`aunn_fast.distributed`) hands in its own
loss and a ``reduce`` that all-reduces the gradients between the backward pass and the optimizer step,
so that its NCCL all-reduce is captured in the same graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .model import AUNN

WARMUP_STEPS = 3


def capturable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether an optimizer's step can be captured: created with capturable=True, or SGD, whose step keeps
    no state on the host (its learning rate is captured as it is, and a replay refuses a changed one)."""
    return isinstance(optimizer, torch.optim.SGD) or all(g.get("capturable", False) for g in optimizer.param_groups)


class GraphedTrainStep:
    """``step(idx, targets) -> loss`` replaying a captured graph; idx/targets int64 [batch_size] on CUDA.

    Warm-up steps run before capture, as CUDA graphs require; the parameters and the
    optimizer state are restored afterwards, so the first replayed step is the first
    real step. Returns the static loss tensor (read it with ``.item()`` when needed).

    ``loss_fn(idx, targets)`` (default ``model.loss``, the batch's mean) is the loss differentiated;
    ``reduce(loss) -> loss``, when given, runs after the backward pass and before clipping, and may
    rewrite the gradients in place (a data-parallel all-reduce); what it returns is the step's loss.
    Both run during warm-up and capture only: a replay runs their captured kernels.
    """

    def __init__(
        self,
        model: AUNN,
        optimizer: torch.optim.Optimizer,
        batch_size: int,
        clip_grad_norm: float | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if model.device.type != "cuda":
            raise ValueError("CUDA graph capture needs a model on a CUDA device")
        if not capturable(optimizer):
            raise ValueError("the optimizer must be created with capturable=True (or be SGD)")
        self.model, self.optimizer, self.batch_size = model, optimizer, batch_size
        self.clip_grad_norm = clip_grad_norm  # the gradients' total norm cut to this before the step (no host sync)
        self.loss_fn = loss_fn if loss_fn is not None else model.loss
        self.reduce = reduce
        self.idx = torch.zeros(batch_size, dtype=torch.int64, device=model.device)
        self.targets = torch.zeros(batch_size, dtype=torch.int64, device=model.device)
        self.graph = torch.cuda.CUDAGraph()
        self.captured_with = self._settings()
        self.loss = self._capture()
        self.captured_state, self.captured_addresses = optimizer.state, self._param_addresses()
        # the graph writes the gradients into the tensors it made during capture (now each .grad):
        # hold them even if a caller sets .grad to None
        self.grads = [p.grad for p in model.parameters()]

    def _settings(self) -> tuple:
        """What the captured kernels were chosen by: backend, precision, and each group's (float) lr."""
        rates = tuple(g["lr"] for g in self.optimizer.param_groups if not torch.is_tensor(g["lr"]))
        return self.model.backend, self.model.precision, rates

    def _param_addresses(self) -> list[int]:
        return [p.data_ptr() for p in self.model.parameters()]

    def _one_step(self) -> torch.Tensor:
        loss = self.loss_fn(self.idx, self.targets)
        loss.backward()
        if self.reduce is not None:
            loss = self.reduce(loss)
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        return loss

    def _capture(self) -> torch.Tensor:
        saved_params = [p.detach().clone() for p in self.model.parameters()]
        saved_state = {
            p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for p, s in self.optimizer.state.items()
        }
        validate, self.model.validate = self.model.validate, False
        try:
            with torch.cuda.device(self.model.device):  # streams and capture on the model's GPU, not the current one
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), warnings.catch_warnings():
                    # torch warns, once per optimizer, that a capturable one stepping uncaptured may be slow:
                    # here it is about to be captured (and the trainer's few eager steps are meant)
                    warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
                    for _ in range(WARMUP_STEPS):
                        self.optimizer.zero_grad(set_to_none=False)
                        self._one_step()
                torch.cuda.current_stream().wait_stream(side)
                # captured without gradients, the backward hands each parameter its gradient tensor
                # (allocated from the graph's pool, rewritten by every replay) instead of zeroing and
                # adding into existing ones: a memset and one add per parameter fewer per step
                self.optimizer.zero_grad(set_to_none=True)
                with torch.cuda.graph(self.graph, stream=torch.cuda.Stream()):
                    return self._one_step()
        finally:  # also after a failed or interrupted capture: the warm-up steps must not stay applied
            self.model.validate = validate
            self._restore(saved_params, saved_state)

    @torch.no_grad()
    def _restore(self, saved_params: list[torch.Tensor], saved_state: dict) -> None:
        """Put back the parameters and optimizer state from before the warm-up."""
        for p, saved in zip(self.model.parameters(), saved_params):
            p.copy_(saved)
        for p, state in self.optimizer.state.items():
            before = saved_state.get(p, {})
            for key, value in state.items():
                if not torch.is_tensor(value):
                    continue
                if key in before:
                    value.copy_(before[key])
                else:  # state the warm-up created: zero is "no step taken yet"
                    value.zero_()

    def __call__(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.load(idx, targets)
        return self.replay()

    def load(self, idx: torch.Tensor, targets: torch.Tensor) -> None:
        """Copy a step's inputs into the graph's, replaying nothing. ValueError/TypeError for inputs of another
        shape or dtype, RuntimeError if what the graph was captured with has changed since: checked here, so
        that a data-parallel rank learns it before its replay, which its peers' all-reduces wait for."""
        if idx.shape != (self.batch_size,) or targets.shape != (self.batch_size,):
            raise ValueError(f"a graphed step takes exactly {self.batch_size} indices and targets")
        if idx.dtype != torch.int64 or targets.dtype != torch.int64:
            raise TypeError(f"a graphed step takes int64 indices and targets, got {idx.dtype} and {targets.dtype}")
        if self._settings() != self.captured_with:  # the replay would silently run the old choices
            raise RuntimeError(
                f"captured with (backend, precision, lr) = {self.captured_with}, now "
                f"{self._settings()}: capture a new GraphedTrainStep"
            )
        if self.optimizer.state is not self.captured_state or self._param_addresses() != self.captured_addresses:
            raise RuntimeError(
                "the parameters or the optimizer state were replaced since capture (say by "
                "optimizer.load_state_dict), and a replay would update the old ones: "
                "capture a new GraphedTrainStep"
            )
        self.idx.copy_(idx)
        self.targets.copy_(targets)

    def replay(self) -> torch.Tensor:
        """One step on the inputs last loaded (checked by :meth:`load`); returns the static loss tensor."""
        self.graph.replay()
        return self.loss

    def release(self) -> None:
        """Free the captured graph; replaying afterwards is an error. A graph holding an NCCL collective
        keeps its communicator busy: release it before the process group is destroyed, or that hangs
        (pytorch/pytorch#115388)."""
        self.graph.reset()
