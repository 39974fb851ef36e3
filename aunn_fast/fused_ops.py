"""Fake implementations and autograd formulas of the operators the fused extension backends define alike.

The ``cpp`` backend (``csrc/cpu/ops.cpp``) and the ``cuda`` backend (``csrc/cuda/fused_step_bindings.cpp``) each
define five operators named ``{prefix}_logits``, ``_argmax``, ``_loss``, ``_loss_backward`` and
``_logits_backward`` with one contract (idx, targets int64 [N]; P the eight float32 parameters of
:class:`AUNNParams`; S the backend's trailing settings, ``residual_every`` and ``eps`` first):

    {prefix}_logits(idx, *P, *S)                  -> float32 [N, V]
    {prefix}_argmax(idx, *P, *S)                  -> int64 [N]
    {prefix}_loss(idx, targets, *P, *S, with_grads) -> (row losses float32 [N], the 8 gradients of their sum or [])
    {prefix}_loss_backward(grad [N], unit_grads, idx, targets, *P, *S) -> the 8 gradients
    {prefix}_logits_backward(grad [N, V], idx, *P, *S)                  -> the 8 gradients

A loss computed with ``with_grads`` brings its gradients along (one pass over the rows), and its backward
scales them by the upstream gradient in ``{prefix}_loss_backward``.
"""

from __future__ import annotations

import torch

PARAMS = 8  # the tensors of AUNNParams


def _fake_logits(idx, *params_and_settings):
    out_weight = params_and_settings[6]
    return idx.new_empty((idx.shape[0], out_weight.shape[0]), dtype=torch.float32)


def _fake_argmax(idx, *params_and_settings):
    return idx.new_empty((idx.shape[0],))


def _fake_loss(idx, targets, *rest):
    params, with_grads = rest[:PARAMS], rest[-1]
    grads = [torch.empty_like(p) for p in params] if with_grads else []
    return idx.new_empty((idx.shape[0],), dtype=torch.float32), grads


def _fake_loss_backward(grad, unit_grads, idx, targets, *rest):
    return [torch.empty_like(p) for p in rest[:PARAMS]]


def _fake_logits_backward(grad, idx, *rest):
    return [torch.empty_like(p) for p in rest[:PARAMS]]


def register(prefix: str, settings: int) -> None:
    """Register the fakes and the autograd formulas of ``{prefix}_*`` (defined by an extension just loaded),
    whose operators take ``settings`` trailing settings; call once per process."""
    logits_backward_op = getattr(torch.ops.aunn_fast, f"{prefix}_logits_backward")
    loss_backward_op = getattr(torch.ops.aunn_fast, f"{prefix}_loss_backward")
    loss_inputs = 2 + PARAMS + settings + 1  # idx, targets, P, S, with_grads

    def logits_setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[: 1 + PARAMS])
        ctx.settings = inputs[1 + PARAMS :]

    def logits_backward(ctx, grad):
        idx, *params = ctx.saved_tensors
        grads = logits_backward_op(grad, idx, *params, *ctx.settings)
        return (None, *grads, *([None] * settings))

    def loss_setup(ctx, inputs, output) -> None:
        _, unit_grads = output
        ctx.mark_non_differentiable(*unit_grads)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs[: 2 + PARAMS], *unit_grads)
        ctx.settings = inputs[2 + PARAMS : 2 + PARAMS + settings]

    def loss_backward(ctx, grad_rows, grad_unit_grads):
        if grad_rows is None:
            return (None,) * loss_inputs
        idx, targets, *rest = ctx.saved_tensors
        params, unit_grads = rest[:PARAMS], rest[PARAMS:]
        grads = loss_backward_op(grad_rows, unit_grads, idx, targets, *params, *ctx.settings)
        return (None, None, *grads, *([None] * (settings + 1)))

    lib = torch.library
    lib.register_fake(f"aunn_fast::{prefix}_logits", _fake_logits)
    lib.register_fake(f"aunn_fast::{prefix}_argmax", _fake_argmax)
    lib.register_fake(f"aunn_fast::{prefix}_loss", _fake_loss)
    lib.register_fake(f"aunn_fast::{prefix}_loss_backward", _fake_loss_backward)
    lib.register_fake(f"aunn_fast::{prefix}_logits_backward", _fake_logits_backward)
    lib.register_autograd(f"aunn_fast::{prefix}_logits", logits_backward, setup_context=logits_setup)
    lib.register_autograd(f"aunn_fast::{prefix}_loss", loss_backward, setup_context=loss_setup)
