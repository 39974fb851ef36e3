"""Input checks that run before any compute, so bad input fails with a clear message.

The range checks read the smallest and largest value back to the host (one device sync per tensor). While
torch.compile traces, or a torch.func transform (vmap, grad, jacrev, ...) runs, they are left out: reading a
value would break the graph, and a vmapped tensor has no storage to read. Types, shapes and devices are
still checked then.
"""

from __future__ import annotations

import torch

from .config import AUNNConfig
from .errors import UserInputError, UserTypeError

INDEX_DTYPES = (torch.int64, torch.int32)


def value_range(values: torch.Tensor) -> tuple[int, int]:
    """(smallest, largest) of a non-empty integer tensor, read back in one transfer: one device sync where
    int(t.min()) and int(t.max()) were two, each of which waits for all queued GPU work."""
    lo, hi = torch.stack(torch.aminmax(values)).tolist()
    return lo, hi


def transforming() -> bool:
    """True while torch.compile traces or a torch.func transform runs: no value can be read back then."""
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None


def check_indices(idx: torch.Tensor, cfg: AUNNConfig, check_range: bool = True) -> torch.Tensor:
    """Return idx as int64, raising TypeError/ValueError for anything that is not a valid index."""
    if not isinstance(idx, torch.Tensor):
        raise UserTypeError(f"indices must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in INDEX_DTYPES:
        raise UserTypeError(
            f"indices must be int64 (or int32), got {idx.dtype}; floating-point indices lose their low bits above 2**24"
        )
    idx = idx.to(torch.int64)
    if check_range and idx.numel() > 0 and not transforming():
        lo, hi = value_range(idx)
        if lo < 0:
            raise UserInputError(f"indices must be non-negative, got {lo}")
        if hi > cfg.max_index:
            raise UserInputError(f"index {hi} does not fit in bits={cfg.bits} (largest valid index {cfg.max_index})")
    return idx


def check_targets(targets: torch.Tensor, idx: torch.Tensor, cfg: AUNNConfig, check_range: bool = True) -> torch.Tensor:
    """Return targets as int64 of idx's shape, raising for wrong type, shape or out-of-vocabulary ids."""
    if not isinstance(targets, torch.Tensor):
        raise UserTypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise UserTypeError(f"targets must be integer token ids, got {targets.dtype}")
    if targets.shape != idx.shape:
        raise UserInputError(f"targets shape {tuple(targets.shape)} does not match indices shape {tuple(idx.shape)}")
    if targets.device != idx.device:
        raise UserInputError(f"targets are on {targets.device} but indices are on {idx.device}")
    targets = targets.to(torch.int64)
    if check_range and targets.numel() > 0 and not transforming():
        lo, hi = value_range(targets)
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise UserInputError(f"target {bad} is outside the vocabulary [0, {cfg.vocab_size})")
    return targets


def check_device(device: str | torch.device) -> torch.device:
    """Return device as a torch.device, raising ValueError if it is malformed or not usable on this machine."""
    try:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is available to PyTorch")
        torch.empty(0, device=device)
    except (RuntimeError, TypeError, AssertionError, NotImplementedError) as exc:
        # torch raises AssertionError for a device type it was built without (e.g. cuda on a CPU build)
        raise UserInputError(f"device {str(device)!r} is not usable on this machine: {exc}") from None
    return device
