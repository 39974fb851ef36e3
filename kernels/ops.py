"""The kernels as PyTorch operators: ``torch.ops.aunn_fast.forward`` / ``backward``.

Both are ``torch.library.triton_op``s (kernels launched through ``wrap_triton``), so
torch.compile and torch.export see the Triton kernels instead of an opaque call and
no graph break occurs. Under TRITON_INTERPRET=1 they are plain ``custom_op``s with a
fake implementation (see :func:`_operator`): still no graph break, kernels opaque.
``forward`` gets its autograd formula from ``register_autograd``: its backward calls the
``backward`` operator on the activations the forward returned.

The kernels' configuration reaches the operators as one string argument, ``options``
(``KernelOptions.encoded``): a constant of the traced graph, so that torch.compile's caches
are keyed by it. Each operator chooses its :class:`KernelConfig` from it and its inputs' shapes.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import Tensor
from torch.library import custom_op, triton_op

from aunn_fast.config import AUNNConfig
from aunn_fast.params import AUNNParams

from . import mlp_backward, mlp_forward
from .common import MODE_ARGMAX, MODE_LOGITS, MODE_LOSS, on_device_of
from .config import KernelConfig, KernelOptions, choose_config, default_options, device_traits


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


def _config(idx: Tensor, in_weight: Tensor, out_weight: Tensor, precision: str, options: str) -> KernelConfig:
    (hidden, bits), vocab = in_weight.shape, out_weight.shape[0]
    return choose_config(hidden, bits, vocab, precision, device_traits(idx.device), KernelOptions.decode(options))


def _forward_impl(
    idx: Tensor,
    targets: Tensor,
    in_weight: Tensor,
    in_bias: Tensor,
    in_gain: Tensor,
    hidden_weight: Tensor,
    hidden_bias: Tensor,
    hidden_gain: Tensor,
    out_weight: Tensor,
    out_bias: Tensor,
    residual_every: int,
    eps: float,
    precision: str,
    mode: int,
    save: bool,
    options: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, stats, acts, zs); see :func:`mlp_forward.forward`."""
    params = AUNNParams(
        in_weight=in_weight,
        in_bias=in_bias,
        in_gain=in_gain,
        hidden_weight=hidden_weight,
        hidden_bias=hidden_bias,
        hidden_gain=hidden_gain,
        out_weight=out_weight,
        out_bias=out_bias,
    )
    config = _config(idx, in_weight, out_weight, precision, options)
    with on_device_of(idx):
        return mlp_forward.forward(idx, targets, params, residual_every, eps, mode, save, config)


def _backward_impl(
    idx: Tensor,
    targets: Tensor,
    grad: Tensor,
    stats: Tensor,
    acts: Tensor,
    zs: Tensor,
    in_weight: Tensor,
    in_bias: Tensor,
    in_gain: Tensor,
    hidden_weight: Tensor,
    hidden_bias: Tensor,
    hidden_gain: Tensor,
    out_weight: Tensor,
    out_bias: Tensor,
    residual_every: int,
    eps: float,
    precision: str,
    mode: int,
    options: str,
) -> list[Tensor]:
    """The parameters' gradients, packed; see :func:`mlp_backward.backward`."""
    params = AUNNParams(
        in_weight=in_weight,
        in_bias=in_bias,
        in_gain=in_gain,
        hidden_weight=hidden_weight,
        hidden_bias=hidden_bias,
        hidden_gain=hidden_gain,
        out_weight=out_weight,
        out_bias=out_bias,
    )
    config = _config(idx, in_weight, out_weight, precision, options)
    with on_device_of(idx):
        return mlp_backward.backward(idx, targets, grad, stats, acts, zs, params, residual_every, eps, mode, config)


forward_op = _operator("aunn_fast::forward")(_forward_impl)
backward_op = _operator("aunn_fast::backward")(_backward_impl)
_FORWARD_ARGUMENTS = tuple(inspect.signature(_forward_impl).parameters)
_HYPERPARAMETERS = ("residual_every", "eps", "precision", "mode", "save", "options")
_SAVED = ("idx", "targets", "stats", "acts", "zs", *AUNNParams._fields)  # what the backward reads, by name


def _setup_context(ctx, inputs, output) -> None:
    args = dict(zip(_FORWARD_ARGUMENTS, inputs))  # autograd passes the operator's inputs in signature order
    ctx.hparams = {name: args[name] for name in _HYPERPARAMETERS}
    out, stats, acts, zs = output
    ctx.mark_non_differentiable(stats, acts, zs)
    # their gradients are None, not zero tensors autograd would fill (a 1 GB memset at 1M rows)
    ctx.set_materialize_grads(False)
    if ctx.hparams["mode"] == MODE_ARGMAX:
        ctx.mark_non_differentiable(out)
    saved = {**args, "stats": stats, "acts": acts, "zs": zs}
    ctx.save_for_backward(*(saved[name] for name in _SAVED))


def _autograd_backward(ctx, grad_out, grad_stats, grad_acts, grad_zs):
    saved = dict(zip(_SAVED, ctx.saved_tensors))
    hp = ctx.hparams
    if hp["mode"] == MODE_ARGMAX:
        raise RuntimeError("argmax predictions have no gradient")
    if not hp["save"]:
        raise RuntimeError("aunn_fast::forward ran with save=False: no activations were kept for backward")
    grads = backward_op(
        grad=grad_out.contiguous(),
        **saved,
        residual_every=hp["residual_every"],
        eps=hp["eps"],
        precision=hp["precision"],
        mode=hp["mode"],
        options=hp["options"],
    )
    vocab, hidden = saved["out_weight"].shape
    param_grads = mlp_backward.parameter_gradients(grads, vocab=vocab, hidden=hidden)
    gradients = {"idx": None, "targets": None, **param_grads._asdict()}
    return tuple(gradients.get(name) for name in _FORWARD_ARGUMENTS)  # None for the non-tensor arguments


forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def run_forward(
    idx: Tensor,
    targets: Tensor | None,
    params: AUNNParams,
    cfg: AUNNConfig,
    precision: str,
    mode: int,
    options: KernelOptions | None = None,
) -> Tensor:
    """The forward operator's first output; activations are saved only when autograd needs them.
    options: the kernels' configuration (default: :func:`config.default_options`)."""
    wrong = {name: p.dtype for name, p in zip(AUNNParams._fields, params) if p.dtype != torch.float32}
    if wrong:
        raise TypeError(
            f"the triton kernels take float32 parameters (they round operands per `precision`), got "
            f"{', '.join(f'{n} {d}' for n, d in wrong.items())}; keep the model in float32 and pass "
            "precision='bf16' instead of converting it"
        )
    save = mode != MODE_ARGMAX and torch.is_grad_enabled() and any(p.requires_grad for p in params)
    if targets is None:
        targets = idx.new_empty(0)
    out, _, _, _ = torch.ops.aunn_fast.forward(
        idx=idx,
        targets=targets,
        **{name: getattr(params, name).contiguous() for name in AUNNParams._fields},
        residual_every=cfg.residual_every,
        eps=cfg.norm_eps,
        precision=precision,
        mode=mode,
        save=save,
        options=_default_encoding() if options is None else options.encoded,
    )
    return out


@torch.compiler.assume_constant_result
def _default_encoding() -> str:
    """default_options(), encoded; torch.compile takes the answer as a constant instead of tracing the call."""
    return default_options().encoded


def logits(
    idx: Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str, options: KernelOptions | None = None
) -> Tensor:
    return run_forward(idx, None, params, cfg, precision, MODE_LOGITS, options)


def loss(
    idx: Tensor,
    targets: Tensor,
    params: AUNNParams,
    cfg: AUNNConfig,
    precision: str,
    reduction: str = "mean",
    options: KernelOptions | None = None,
) -> Tensor:
    """The rows' cross-entropies reduced; their backward takes any per-row upstream gradient."""
    row_loss = run_forward(idx, targets, params, cfg, precision, MODE_LOSS, options)
    if reduction == "none":
        return row_loss
    # mean(): one reduction, and a backward that hands the operator a contiguous gradient; sum() / N
    # was a second launch each way (the division, and a copy of the sum's stride-0 gradient)
    if reduction == "sum" or idx.shape[0] == 0:  # the mean of no rows is 0, with zero gradients
        return row_loss.sum()
    return row_loss.mean()


def predict(
    idx: Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str, options: KernelOptions | None = None
) -> Tensor:
    with torch.no_grad():
        return run_forward(idx, None, params, cfg, precision, MODE_ARGMAX, options)
