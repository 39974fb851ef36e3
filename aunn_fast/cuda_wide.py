"""The wide-model CUDA path (``csrc/cuda/wide_*``, H = 256-1024): bf16 products with the layer epilogues fused.

Operators (``torch.ops.aunn_fast``, defined in ``csrc/cuda/wide_bindings.cpp``; idx, targets int64 [N] on one
GPU, the eight float32 parameters P of :class:`AUNNParams` there too, then ``residual_every``, ``eps``, and
``poison`` (tests: every buffer the operator allocates starts as NaN)):

    cuda_wide_logits(idx, *P)                                  -> float32 [N, V]
    cuda_wide_argmax(idx, *P)                                  -> int64 [N]
    cuda_wide_loss(idx, targets, *P, reduction, with_grads)    -> (loss: scalar, or [N] for "none";
                                                                   the 8 gradients of the loss, or [])
    cuda_wide_loss_backward(grad [N], idx, targets, *P)        -> the 8 gradients of sum(grad * row losses)
    cuda_wide_logits_backward(grad [N, V], idx, *P)            -> the 8 gradients of sum(grad * logits)

A scalar loss ("mean", "sum") brings its gradients from the same call, and its backward only scales them; the
row losses of "none" take any upstream gradient through ``cuda_wide_loss_backward`` (a second forward). This
module registers the fake implementations and autograd formulas and offers ``logits`` / ``loss`` / ``predict``
for the ``cuda`` backend (bf16 only).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from . import cpp_build
from .config import AUNNConfig
from .params import AUNNParams

SUPPORTED_PRECISIONS = ("bf16",)
REDUCTIONS = ("mean", "sum", "none")
_OPS = (
    "cuda_wide_logits",
    "cuda_wide_argmax",
    "cuda_wide_loss",
    "cuda_wide_loss_backward",
    "cuda_wide_logits_backward",
)

_registered: dict[str, bool] = {}  # "done": the fake and autograd parts are registered
_register_lock = threading.Lock()


def unavailable_reason(device: torch.device) -> str | None:
    """None when the wide operators run on ``device`` (building the CUDA extension on first use), else why not."""
    if torch.device(device).type != "cuda":
        return "the wide CUDA path runs on CUDA devices only"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "the wide CUDA path needs bf16 tensor cores (compute capability 8.0 or later)"
    reason = cpp_build.cuda_unavailable_reason()
    if reason is not None:
        return reason
    if not all(hasattr(torch.ops.aunn_fast, op) for op in _OPS):
        return "the CUDA extension was built without csrc/cuda/wide_*"
    _register_python_parts()
    return None


# ----------------------------------------------------------------------------- fake tensors and autograd


def _fake_logits(idx, in_weight, *rest):
    out_weight = rest[5]
    return idx.new_empty((idx.shape[0], out_weight.shape[0]), dtype=torch.float32)


def _fake_argmax(idx, *rest):
    return idx.new_empty((idx.shape[0],))


def _fake_loss(idx, targets, *rest):
    params, reduction, with_grads = rest[:8], rest[10], rest[11]
    shape = (idx.shape[0],) if reduction == "none" else ()
    grads = [torch.empty_like(p) for p in params] if with_grads else []
    return idx.new_empty(shape, dtype=torch.float32), grads


def _fake_loss_backward(grad, idx, targets, *rest):
    return [torch.empty_like(p) for p in rest[:8]]


def _fake_logits_backward(grad, idx, *rest):
    return [torch.empty_like(p) for p in rest[:8]]


def _logits_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:9])
    ctx.settings = inputs[9:]


def _logits_backward(ctx, grad):
    idx, *params = ctx.saved_tensors
    grads = torch.ops.aunn_fast.cuda_wide_logits_backward(grad, idx, *params, *ctx.settings)
    return (None, *grads, None, None, None)


def _loss_setup(ctx, inputs, output) -> None:
    _, unit_grads = output
    ctx.mark_non_differentiable(*unit_grads)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs[:10], *unit_grads)
    ctx.settings = inputs[10:12]  # residual_every, eps
    ctx.reduction, ctx.poison = inputs[12], inputs[14]


def _loss_backward(ctx, grad_loss, grad_unit_grads):
    idx, targets, *rest = ctx.saved_tensors
    params, unit_grads = rest[:8], rest[8:]
    if grad_loss is None:
        return (None,) * 15
    if unit_grads:  # a scalar loss: its gradients came with it
        grads = [g * grad_loss for g in unit_grads]
    else:
        rows = grad_loss
        if ctx.reduction != "none":
            n = idx.shape[0]
            rows = grad_loss.expand(n) / n if ctx.reduction == "mean" else grad_loss.expand(n)
        grads = torch.ops.aunn_fast.cuda_wide_loss_backward(rows, idx, targets, *params, *ctx.settings, ctx.poison)
    return (None, None, *grads, None, None, None, None, None)


def _register_python_parts() -> None:
    """Fake implementations and autograd formulas, once, after the extension defined the operators."""
    if "done" in _registered:
        return
    with _register_lock:
        if "done" in _registered:
            return
        lib = torch.library
        lib.register_fake("aunn_fast::cuda_wide_logits", _fake_logits)
        lib.register_fake("aunn_fast::cuda_wide_argmax", _fake_argmax)
        lib.register_fake("aunn_fast::cuda_wide_loss", _fake_loss)
        lib.register_fake("aunn_fast::cuda_wide_loss_backward", _fake_loss_backward)
        lib.register_fake("aunn_fast::cuda_wide_logits_backward", _fake_logits_backward)
        lib.register_autograd("aunn_fast::cuda_wide_logits", _logits_backward, setup_context=_logits_setup)
        lib.register_autograd("aunn_fast::cuda_wide_loss", _loss_backward, setup_context=_loss_setup)
        _registered["done"] = True


# ----------------------------------------------------------------------------- the backend's ops


def _operands(params: AUNNParams, cfg: AUNNConfig, precision: str) -> tuple[list[Tensor], int, float]:
    if precision not in SUPPORTED_PRECISIONS:
        raise ValueError(
            f"precision {precision!r} is not offered by the wide CUDA path (bf16 only); use the triton backend"
        )
    wrong = {name: p.dtype for name, p in zip(AUNNParams._fields, params) if p.dtype != torch.float32}
    if wrong:
        raise TypeError(
            f"the wide CUDA path takes float32 parameters, got {', '.join(f'{n} {d}' for n, d in wrong.items())}"
        )
    return [p.contiguous() for p in params], cfg.residual_every, cfg.norm_eps


def logits(idx: Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str = "bf16", poison: bool = False) -> Tensor:
    """float32 logits [N, V] of int64 indices [N]; differentiable w.r.t. every parameter."""
    p, every, eps = _operands(params, cfg, precision)
    return torch.ops.aunn_fast.cuda_wide_logits(idx, *p, every, eps, poison)


def loss(
    idx: Tensor,
    targets: Tensor,
    params: AUNNParams,
    cfg: AUNNConfig,
    precision: str = "bf16",
    reduction: str = "mean",
    poison: bool = False,
) -> Tensor:
    """Cross-entropy, float32, logits never leave the GPU's scratch: "mean" / "sum" (scalars; where autograd will
    need them the gradients come from the same call) or "none" ([N])."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose from {', '.join(REDUCTIONS)}")
    p, every, eps = _operands(params, cfg, precision)
    with_grads = reduction != "none" and torch.is_grad_enabled() and any(t.requires_grad for t in p)
    value, _ = torch.ops.aunn_fast.cuda_wide_loss(idx, targets, *p, every, eps, reduction, with_grads, poison)
    return value


def predict(idx: Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str = "bf16", poison: bool = False) -> Tensor:
    """int64 [N] argmax of the logits (first maximum on ties); no gradient."""
    p, every, eps = _operands(params, cfg, precision)
    with torch.no_grad():
        return torch.ops.aunn_fast.cuda_wide_argmax(idx, *p, every, eps, poison)
