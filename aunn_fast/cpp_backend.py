"""The ``cpp`` backend: the fused CPU AUNN of the C++ extension (``csrc/cpu``): fp32, and bf16 (operands of every
product rounded to bfloat16, float32 sums, on AVX512-BF16's vdpbf16ps) where the build's CPU has those
instructions.

Operators (``torch.ops.aunn_fast``, defined in ``csrc/cpu/ops.cpp``; idx, targets int64 [N], the eight float32
parameters P of :class:`AUNNParams`, then ``residual_every``, ``eps``, ``bf16``):

    cpp_logits(idx, *P)                          -> float32 [N, V]
    cpp_argmax(idx, *P)                          -> int64 [N]
    cpp_loss(idx, targets, *P, with_grads)       -> (row losses float32 [N], the 8 gradients of their sum or [])
    cpp_loss_backward(grad [N], unit_grads, idx, targets, *P)  -> the 8 gradients
    cpp_logits_backward(grad [N, V], idx, *P)    -> the 8 gradients
    cpp_train_step(idx, targets, params!, grads!, exp_avg!, exp_avg_sq!, step, lr, beta1, beta2, adam_eps,
                   weight_decay, max_norm, ...)  -> mean loss; grads: the (clipped) gradients the update used;
                   grads and the moments each eight parameter-shaped tensors or one holding them back to back
    cpp_has_bf16()                               -> whether this build runs bf16

This module registers their fake implementations and autograd formulas (:mod:`aunn_fast.fused_ops`, shared
with the other fused backend), and offers the backend's
``logits`` / ``loss`` / ``predict``, :class:`OneCallStep` (a conditioning step in one C++ call) and
:class:`FusedAdamWStep` (the trainer's clipped AdamW step in one C++ call).
"""

from __future__ import annotations

import threading

import torch
import torch.optim.optimizer as torch_optimizer
from torch import Tensor

from . import cpp_build, fused_ops
from .config import AUNNConfig
from .params import AUNNParams

SUPPORTED_PRECISIONS = ("fp32", "bf16")
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as inference.conditioning_optimizer uses them
ADAM_EPS = 1e-8

_registered: dict[str, bool] = {}  # "done": the fake and autograd parts are registered; "bf16": cpp_has_bf16()
_register_lock = threading.Lock()


def unavailable_reason(device: torch.device) -> str | None:
    """None when the backend runs on ``device`` (building the extension on first use), else why not."""
    if torch.device(device).type != "cpu":
        return "the cpp backend runs on the CPU only"
    reason = cpp_build.unavailable_reason()
    if reason is None:
        _register_python_parts()
    return reason


def precision_unavailable_reason(precision: str) -> str | None:
    """None when ``precision`` runs here (the extension loaded, and for bf16 a build with AVX512-BF16), else why
    not."""
    reason = unavailable_reason(torch.device("cpu"))
    if reason is not None or precision != "bf16" or _registered["bf16"]:
        return reason
    return (
        f"its bf16 needs a CPU with AVX512-BF16 instructions (the extension was built for -march={cpp_build.march()}"
        " without them); use precision='fp32', or backend='reference' for an emulated bf16"
    )


def check_settings() -> None:
    """ValueError for a bad AUNN_FAST_CPP value."""
    cpp_build.check_setting()


# ----------------------------------------------------------------------------- fake tensors and autograd


def _fake_train_step(idx, targets, params, grads, exp_avg, exp_avg_sq, *settings):
    return idx.new_empty((), dtype=torch.float32)


def _register_python_parts() -> None:
    """Fake implementations and autograd formulas, once, after the extension defined the operators."""
    if "done" in _registered:
        return
    with _register_lock:
        if "done" in _registered:
            return
        fused_ops.register("cpp", settings=3)  # residual_every, eps, bf16
        torch.library.register_fake("aunn_fast::cpp_train_step", _fake_train_step)
        _registered["bf16"] = bool(torch.ops.aunn_fast.cpp_has_bf16())
        _registered["done"] = True


# ----------------------------------------------------------------------------- the backend's ops


def _settings(cfg: AUNNConfig, precision: str) -> tuple[int, float, bool]:
    """The operators' trailing arguments (residual_every, eps, bf16); ValueError for a precision not run here."""
    if precision not in SUPPORTED_PRECISIONS:
        raise ValueError(
            f"precision {precision!r} is not supported by the cpp backend (fp32, bf16); use "
            "backend='reference' or 'compile' for an emulated tf32"
        )
    reason = precision_unavailable_reason(precision)
    if reason is not None:
        raise ValueError(f"the cpp backend cannot run precision {precision!r} here: {reason}")
    return cfg.residual_every, cfg.norm_eps, precision == "bf16"


def _operands(params: AUNNParams, cfg: AUNNConfig, precision: str) -> tuple[list[Tensor], tuple[int, float, bool]]:
    settings = _settings(cfg, precision)
    wrong = {name: p.dtype for name, p in zip(AUNNParams._fields, params) if p.dtype != torch.float32}
    if wrong:
        raise TypeError(
            f"the cpp backend takes float32 parameters, got {', '.join(f'{n} {d}' for n, d in wrong.items())}"
        )
    return [p.contiguous() for p in params], settings


def logits(idx: Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str) -> Tensor:
    """float32 logits [N, V] of int64 indices [N]; differentiable w.r.t. every parameter."""
    p, settings = _operands(params, cfg, precision)
    return torch.ops.aunn_fast.cpp_logits(idx, *p, *settings)


def loss(
    idx: Tensor, targets: Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy, float32, logits never stored: "mean" / "sum" (scalars) or "none" ([N]). Where autograd
    will need them, the gradients of the rows' sum are computed in the same pass; a backward whose upstream
    gradient is the same for every row ("mean", "sum") only scales them."""
    p, settings = _operands(params, cfg, precision)
    with_grads = torch.is_grad_enabled() and any(t.requires_grad for t in p)
    rows, _ = torch.ops.aunn_fast.cpp_loss(idx, targets, *p, *settings, with_grads)
    if reduction == "none":
        return rows
    if reduction == "sum" or idx.shape[0] == 0:
        return rows.sum()
    return rows.mean()


def predict(idx: Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str) -> Tensor:
    """int64 [N] argmax of the logits (first maximum on ties); no gradient."""
    p, settings = _operands(params, cfg, precision)
    with torch.no_grad():
        return torch.ops.aunn_fast.cpp_argmax(idx, *p, *settings)


class OneCallStep:
    """``step(idx, targets)``: one step of a fresh Adam (torch.optim.Adam's defaults) or SGD on the mean loss,
    forward, backward and update in one C++ call in the model's precision, the parameters updated in place and
    their ``.grad`` set to the step's gradients (as an eager step leaves them). No input checks (the caller
    validates once).

    The gradients and Adam's moments each live in one flat buffer (``.grad`` holds views of it), so a call passes
    the operator three buffers instead of 24 tensors: at a prompt's few indices, converting each argument is a
    sizeable share of the step."""

    def __init__(self, model: torch.nn.Module, optimizer: str, lr: float) -> None:
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {optimizer!r}; choose from adam, sgd")
        self.params = [getattr(model, name) for name in AUNNParams._fields]
        if any(p.dtype != torch.float32 or not p.is_contiguous() for p in self.params):
            raise TypeError("the cpp backend's step takes contiguous float32 parameters")
        sizes = [p.numel() for p in self.params]
        flat = torch.zeros(3 if optimizer == "adam" else 1, sum(sizes))
        self.flat_grads = [flat[0]]
        self.moments = ([flat[1]], [flat[2]]) if optimizer == "adam" else ([], [])
        self.grads = [g.view_as(p) for g, p in zip(flat[0].split(sizes), self.params)]
        self.steps = 0
        # the operator's overload itself (no overload resolution per call) and its arguments after `step`: no
        # weight decay, no gradient clipping
        self.op = torch.ops.aunn_fast.cpp_train_step.default
        self.update = (float(lr), *ADAM_BETAS, ADAM_EPS, 0.0, 0.0, *_settings(model.cfg, model.active_precision()))

    def __call__(self, idx: Tensor, targets: Tensor) -> Tensor:
        """The mean loss before the step, float32 scalar (the operator runs outside autograd in any grad mode)."""
        self.steps += 1
        loss = self.op(idx, targets, self.params, self.flat_grads, *self.moments, self.steps, *self.update)
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:  # set once: later steps write into the same buffers
                p.grad = g
        return loss


class FusedAdamWStep:
    """``step(idx, targets) -> loss``: the trainer's step in one C++ call: forward, mean loss, backward, the
    gradients' total norm clipped to ``max_norm`` (as ``torch.nn.utils.clip_grad_norm_``; None: no clipping) and
    ``optimizer``'s update (torch.optim.AdamW's), the parameters updated in place.

    The learning rate, betas, eps and weight decay are read from the optimizer's param group at every call, and
    its state (``step``, ``exp_avg``, ``exp_avg_sq``, as torch's AdamW keeps them) is used and updated in place,
    so a schedule, a checkpoint and a resume see the usual optimizer. Each ``.grad`` is left holding the clipped
    gradients the update used. Build it with :func:`fused_adamw_step`, which says when it applies; indices and
    targets are not checked here (the trainer validates its data once).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.AdamW, max_norm: float | None) -> None:
        self.params = [getattr(model, name) for name in AUNNParams._fields]
        self.optimizer, self.group = optimizer, optimizer.param_groups[0]
        self.state = [optimizer.state[p] for p in self.params]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.max_norm = 0.0 if max_norm is None else float(max_norm)
        self.settings = _settings(model.cfg, "fp32")

    def _moments(self) -> tuple[list[Tensor], list[Tensor]]:
        """exp_avg and exp_avg_sq of every parameter, created (zeros) and the step counted as torch's AdamW does."""
        for state, p in zip(self.state, self.params):
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
        return [s["exp_avg"] for s in self.state], [s["exp_avg_sq"] for s in self.state]

    @torch.no_grad()
    def __call__(self, idx: Tensor, targets: Tensor) -> Tensor:
        """The mean loss before the step, float32 scalar."""
        exp_avg, exp_avg_sq = self._moments()
        beta1, beta2 = self.group["betas"]
        loss = torch.ops.aunn_fast.cpp_train_step(
            idx,
            targets,
            self.params,
            self.grads,
            exp_avg,
            exp_avg_sq,
            int(self.state[0]["step"].item()),
            float(self.group["lr"]),
            beta1,
            beta2,
            self.group["eps"],
            self.group["weight_decay"],
            self.max_norm,
            *self.settings,
        )
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.optimizer._opt_called = True  # what optimizer.step() sets: a schedule's check that the step ran
        return loss


def fused_adamw_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None
) -> FusedAdamWStep | None:
    """A :class:`FusedAdamWStep` for ``model`` and ``optimizer`` when the step can run in one C++ call (the
    model runs on the cpp backend in fp32, and ``optimizer`` is a plain torch.optim.AdamW over exactly the
    model's parameters: one group, no amsgrad, maximize, capturable, differentiable, foreach or fused, a float
    lr, steps counted alike for every parameter, no step hooks); else None, and the caller runs the ordinary
    eager step."""
    if type(optimizer) is not torch.optim.AdamW or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    plain = not any(group.get(flag) for flag in ("amsgrad", "maximize", "capturable", "differentiable", "foreach"))
    if not plain or group.get("fused") or torch.is_tensor(group["lr"]):
        return None
    hooks = (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks)
    if (
        any(hooks)
        or any(torch_optimizer._global_optimizer_pre_hooks.values())
        or any(torch_optimizer._global_optimizer_post_hooks.values())
    ):  # a step hook expects optimizer.step() itself
        return None
    if model.active_backend().name != "cpp" or model.active_precision() != "fp32":
        return None
    params = [getattr(model, name) for name in AUNNParams._fields]
    if [id(p) for p in group["params"]] != [id(p) for p in params]:
        return None
    if any(p.dtype != torch.float32 or not p.is_contiguous() for p in params):
        return None
    steps = {float(optimizer.state[p]["step"]) for p in params if optimizer.state[p]}
    if len(steps) > 1 or (steps and len(optimizer.state) != len(params)):
        return None
    return FusedAdamWStep(model, optimizer, max_norm)
