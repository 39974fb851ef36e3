"""Fused Triton kernels for AUNN: logits, loss (with backward) and predictions.

Installed as ``aunn_fast.kernels``. Importing this package does not import Triton;
:func:`unavailable_reason` says whether the kernels can run on a device, and the
first call of ``logits`` / ``loss`` / ``predict`` loads them. Their configuration is a
:class:`~.config.KernelOptions` value, passed as ``options`` (default: the environment switches,
read once). Design and measurements: kernels/DESIGN.md; switches: docs/kernels.md.

Layering: this package imports from aunn_fast only its base layer, the modules that import nothing
else of aunn_fast: ``aunn_fast.config`` (AUNNConfig), ``aunn_fast.params`` (AUNNParams) and
``aunn_fast.rounding`` (operand rounding, shared with the reference). Never the reference itself.
"""

from __future__ import annotations

import os

import torch

from aunn_fast.config import AUNNConfig
from aunn_fast.params import AUNNParams

from .config import KernelOptions, default_options

SUPPORTED_PRECISIONS = ("fp32", "tf32", "bf16")

__all__ = ["SUPPORTED_PRECISIONS", "KernelOptions", "check_switches", "logits", "loss", "predict", "unavailable_reason"]


def unavailable_reason(device: torch.device) -> str | None:
    """None when the kernels can run on ``device``; otherwise what is missing."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"the `triton` package is not importable ({exc}); pip install triton"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        if interpret:
            return "TRITON_INTERPRET=1 is set: Triton runs kernels on the CPU, not on CUDA tensors"
        if not torch.cuda.is_available():
            return "CUDA is not available to PyTorch"
        return None
    if device.type == "cpu":
        if not interpret:
            return (
                "Triton has no CPU backend; set TRITON_INTERPRET=1 before triton is first imported "
                "to run the kernels in the (slow) interpreter"
            )
        # imported (as the first call would) rather than looked up in sys.modules: torch.compile guards
        # on such a lookup, and a first call under it imports the module in the same trace
        from . import mlp_forward

        if not _is_interpreted(mlp_forward.aunn_forward_kernel):
            return "the kernels were compiled before TRITON_INTERPRET=1 was set; set it before importing them"
        return None
    return f"Triton kernels do not run on device type {device.type!r}"


def check_switches() -> None:
    """A ValueError naming the variable if AUNN_FAST_SIGMOID, AUNN_FAST_WEIGHT_GRAD or AUNN_FAST_FP32_PRODUCTS
    holds an unknown value (reading them into the default options). The kernels read them at their first
    call; the trainer and the CLI call this first, so that a bad value stops a run before anything is written."""
    default_options()


def _is_interpreted(kernel: object) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def logits(
    idx: torch.Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str, options: KernelOptions | None = None
) -> torch.Tensor:
    """float32 logits [N, V] of int64 indices [N]; differentiable w.r.t. every parameter."""
    from . import ops

    return ops.logits(idx, params, cfg, precision, options)


def loss(
    idx: torch.Tensor,
    targets: torch.Tensor,
    params: AUNNParams,
    cfg: AUNNConfig,
    precision: str,
    reduction: str = "mean",
    options: KernelOptions | None = None,
) -> torch.Tensor:
    """Cross-entropy, float32: the mean or sum (scalars) or each row's ("none", [N]); logits are
    never written to memory."""
    from . import ops

    return ops.loss(idx, targets, params, cfg, precision, reduction, options)


def predict(
    idx: torch.Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str, options: KernelOptions | None = None
) -> torch.Tensor:
    """int64 [N] argmax of the logits (first maximum on ties); no gradient."""
    from . import ops

    return ops.predict(idx, params, cfg, precision, options)
