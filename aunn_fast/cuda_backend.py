"""The ``cuda`` backend: the fused CUDA AUNN of the C++ extension (``csrc/cuda/fused_step.cu``), bf16 products.

For hidden widths 16, 32, 64 and 128 and vocabularies up to 256: one kernel per call runs the whole forward and,
for a loss that needs gradients, the backward with every parameter's gradient (``csrc/cuda/DESIGN.md``). Other
shapes are a clear error (``backend="triton"`` runs them). Not yet run on a GPU: never picked by ``auto``.

Operators (``torch.ops.aunn_fast``, defined in ``csrc/cuda/fused_step_bindings.cpp``; idx, targets int64 [N] on
the GPU, the eight float32 parameters P of :class:`AUNNParams`, then ``residual_every``, ``eps``):

    cuda_logits(idx, *P)                          -> float32 [N, V]
    cuda_argmax(idx, *P)                          -> int64 [N]
    cuda_loss(idx, targets, *P, with_grads)       -> (row losses float32 [N], the 8 gradients of their sum or [])
    cuda_loss_backward(grad [N], unit_grads, idx, targets, *P)  -> the 8 gradients
    cuda_logits_backward(grad [N, V], idx, *P)    -> the 8 gradients

This module registers their fake implementations and autograd formulas (:mod:`aunn_fast.fused_ops`, shared
with the other fused backend), and offers the backend's ``logits`` /
``loss`` / ``predict``.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from . import cpp_build, fused_ops
from .config import AUNNConfig
from .params import AUNNParams

SUPPORTED_PRECISIONS = ("bf16",)
SUPPORTED_HIDDEN = (16, 32, 64, 128)
MAX_VOCAB = 256

_registered: dict[str, bool] = {}  # "done": the fake and autograd parts are registered
_register_lock = threading.Lock()


def unavailable_reason(device: torch.device) -> str | None:
    """None when the backend runs on ``device`` (building the extension on first use), else why not."""
    if torch.device(device).type != "cuda":
        return "the cuda backend runs on CUDA GPUs only"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    reason = cpp_build.cuda_unavailable_reason()
    if reason is None:
        _register_python_parts()
    return reason


def check_settings() -> None:
    """ValueError for a bad AUNN_FAST_CPP value (the switch of the whole C++ extension)."""
    cpp_build.check_setting()


def _register_python_parts() -> None:
    """Fake implementations and autograd formulas, once, after the extension defined the operators."""
    if "done" in _registered:
        return
    with _register_lock:
        if "done" in _registered:
            return
        fused_ops.register("cuda", settings=2)  # residual_every, eps
        _registered["done"] = True


# ----------------------------------------------------------------------------- the backend's ops


def check_shape(cfg: AUNNConfig) -> None:
    """ValueError unless the fused step supports the model's hidden width and vocabulary."""
    if cfg.hidden not in SUPPORTED_HIDDEN or cfg.vocab_size > MAX_VOCAB:
        raise ValueError(
            f"the cuda backend supports hidden widths {', '.join(map(str, SUPPORTED_HIDDEN))} and vocabularies up "
            f"to {MAX_VOCAB}, got hidden {cfg.hidden} and vocabulary {cfg.vocab_size}; use backend='triton'"
        )


def _operands(params: AUNNParams, cfg: AUNNConfig, precision: str) -> tuple[list[Tensor], int, float]:
    if precision not in SUPPORTED_PRECISIONS:
        raise ValueError(
            f"precision {precision!r} is not supported by the cuda backend (bf16 only); use backend='triton'"
        )
    check_shape(cfg)
    wrong = {name: p.dtype for name, p in zip(AUNNParams._fields, params) if p.dtype != torch.float32}
    if wrong:
        raise TypeError(
            f"the cuda backend takes float32 parameters, got {', '.join(f'{n} {d}' for n, d in wrong.items())}"
        )
    return [p.contiguous() for p in params], cfg.residual_every, cfg.norm_eps


def logits(idx: Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str) -> Tensor:
    """float32 logits [N, V] of int64 indices [N]; differentiable w.r.t. every parameter."""
    p, every, eps = _operands(params, cfg, precision)
    return torch.ops.aunn_fast.cuda_logits(idx, *p, every, eps)


def loss(
    idx: Tensor, targets: Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy, float32, logits never stored: "mean" / "sum" (scalars) or "none" ([N]). Where autograd
    will need them, the gradients of the rows' sum are computed in the same launch; the backward of a sum hands
    the operator an expanded upstream gradient, which only scales them ("mean" is a sum times 1 / N for this)."""
    p, every, eps = _operands(params, cfg, precision)
    with_grads = torch.is_grad_enabled() and any(t.requires_grad for t in p)
    rows, _ = torch.ops.aunn_fast.cuda_loss(idx, targets, *p, every, eps, with_grads)
    if reduction == "none":
        return rows
    if reduction == "sum" or idx.shape[0] == 0:
        return rows.sum()
    return rows.sum() * (1.0 / idx.shape[0])


def predict(idx: Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str) -> Tensor:
    """int64 [N] argmax of the logits (first maximum on ties); no gradient."""
    p, every, eps = _operands(params, cfg, precision)
    with torch.no_grad():
        return torch.ops.aunn_fast.cuda_argmax(idx, *p, every, eps)
