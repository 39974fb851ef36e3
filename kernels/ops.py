"""The kernels as PyTorch operators: ``torch.ops.aunn_fast.forward`` / ``backward``.

Both are ``torch.library.triton_op``s (kernels launched through ``wrap_triton``), so
torch.compile and torch.export see the Triton kernels instead of an opaque call and
no graph break occurs. Under TRITON_INTERPRET=1 they are plain ``custom_op``s with a
fake implementation (see :func:`_operator`): still no graph break, kernels opaque.
``forward`` gets its autograd formula from
``register_autograd``: its backward calls the ``backward`` operator on the
activations the forward returned.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.library import custom_op, triton_op

from aunn_fast.config import AUNNConfig
from aunn_fast.params import AUNNParams

from . import mlp_backward, mlp_forward
from .common import on_device_of
from .mlp_forward import MODE_ARGMAX, MODE_LOGITS, MODE_LOSS


def _operator(name: str):
    """triton_op on GPUs; under TRITON_INTERPRET=1 an opaque custom_op instead.

    A triton_op lets torch.compile trace into the kernels, but in the interpreter
    wrap_triton returns the plain kernel, so a traced graph would contain no launches.
    The custom_op's fake implementation is the same function: its launches are skipped
    on fake tensors (common.launch) and it only allocates outputs of the right shapes.
    """
    def register(fn):
        if os.environ.get("TRITON_INTERPRET") == "1":
            op = custom_op(name, fn, mutates_args=())
            op.register_fake(fn)
            return op
        return triton_op(name, fn, mutates_args=())
    return register


@_operator("aunn_fast::forward")
def forward_op(idx: Tensor, targets: Tensor, in_weight: Tensor, in_bias: Tensor, in_gain: Tensor,
               hidden_weight: Tensor, hidden_bias: Tensor, hidden_gain: Tensor, out_weight: Tensor,
               out_bias: Tensor, residual_every: int, eps: float, precision: str, mode: int,
               save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, lse, acts, zs); see :func:`mlp_forward.forward`."""
    with on_device_of(idx):
        return mlp_forward.forward(idx, targets, in_weight, in_bias, in_gain, hidden_weight, hidden_bias,
                                   hidden_gain, out_weight, out_bias, residual_every, eps, precision, mode, save)


@_operator("aunn_fast::backward")
def backward_op(idx: Tensor, targets: Tensor, grad: Tensor, lse: Tensor, acts: Tensor, zs: Tensor,
                in_weight: Tensor, in_bias: Tensor, in_gain: Tensor, hidden_weight: Tensor,
                hidden_bias: Tensor, hidden_gain: Tensor, out_weight: Tensor, out_bias: Tensor,
                residual_every: int, eps: float, precision: str, mode: int) -> list[Tensor]:
    """The parameters' gradients, packed; see :func:`mlp_backward.backward`."""
    with on_device_of(idx):
        return mlp_backward.backward(idx, targets, grad, lse, acts, zs, in_weight, in_bias, in_gain,
                                     hidden_weight, hidden_bias, hidden_gain, out_weight, out_bias,
                                     residual_every, eps, precision, mode)


def _setup_context(ctx, inputs, output) -> None:
    idx, targets, *params = inputs[:10]
    residual_every, eps, precision, mode, save = inputs[10:]
    out, lse, acts, zs = output
    ctx.mark_non_differentiable(lse, acts, zs)
    # their gradients are None, not zero tensors autograd would fill (a 1 GB memset at 1M rows)
    ctx.set_materialize_grads(False)
    if mode == MODE_ARGMAX:
        ctx.mark_non_differentiable(out)
    ctx.save_for_backward(idx, targets, lse, acts, zs, *params)
    ctx.hparams = (residual_every, eps, precision, mode, save)


def _backward(ctx, grad_out, grad_lse, grad_acts, grad_zs):
    idx, targets, lse, acts, zs, *params = ctx.saved_tensors
    residual_every, eps, precision, mode, save = ctx.hparams
    if mode == MODE_ARGMAX:
        raise RuntimeError("argmax predictions have no gradient")
    if not save:
        raise RuntimeError("aunn_fast::forward ran with save=False: no activations were kept for backward")
    grads = backward_op(idx, targets, grad_out.contiguous(), lse, acts, zs, *params,
                        residual_every, eps, precision, mode)
    out_weight = params[6]
    return (None, None, *mlp_backward.parameter_gradients(grads, *out_weight.shape), None, None, None, None, None)


forward_op.register_autograd(_backward, setup_context=_setup_context)


def run_forward(idx: Tensor, targets: Tensor | None, params: AUNNParams, cfg: AUNNConfig,
                precision: str, mode: int) -> Tensor:
    """The forward operator's first output; activations are saved only when autograd needs them."""
    wrong = {name: p.dtype for name, p in zip(AUNNParams._fields, params) if p.dtype != torch.float32}
    if wrong:
        raise TypeError(f"the triton kernels take float32 parameters (they round operands per `precision`), got "
                        f"{', '.join(f'{n} {d}' for n, d in wrong.items())}; keep the model in float32 and pass "
                        "precision='bf16' instead of converting it")
    save = mode != MODE_ARGMAX and torch.is_grad_enabled() and any(p.requires_grad for p in params)
    if targets is None:
        targets = idx.new_empty(0)
    params = [p.contiguous() for p in params]
    out, _, _, _ = torch.ops.aunn_fast.forward(idx, targets, *params, cfg.residual_every, cfg.norm_eps,
                                              precision, mode, save)
    return out


def logits(idx: Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str) -> Tensor:
    return run_forward(idx, None, params, cfg, precision, MODE_LOGITS)


def loss(idx: Tensor, targets: Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str,
         reduction: str = "mean") -> Tensor:
    """The rows' cross-entropies reduced; their backward takes any per-row upstream gradient."""
    row_loss = run_forward(idx, targets, params, cfg, precision, MODE_LOSS)
    if reduction == "none":
        return row_loss
    # mean(): one reduction, and a backward that hands the operator a contiguous gradient; sum() / N
    # was a second launch each way (the division, and a copy of the sum's stride-0 gradient)
    if reduction == "sum" or idx.shape[0] == 0:  # the mean of no rows is 0, with zero gradients
        return row_loss.sum()
    return row_loss.mean()


def predict(idx: Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str) -> Tensor:
    with torch.no_grad():
        return run_forward(idx, None, params, cfg, precision, MODE_ARGMAX)
