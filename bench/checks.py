"""Correctness of a provider against the fp32 reference on the same weights and inputs.

Errors are normwise relative: ``max|x - ref| / max|ref|`` over a whole tensor
(for gradients, the largest such value over the parameter tensors). The
reference is evaluated in chunks so a big batch costs one chunk of extra memory.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from aunn_fast import AUNN
from aunn_fast.cuda_graph import GraphedTrainStep
from aunn_fast.train import TrainConfig, make_optimizer

# Largest accepted relative error by precision.
TOLERANCES: dict[str, float] = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 5e-2}

_CHUNK_ELEMENTS = 1 << 26  # float32 activations per reference chunk (~256 MiB)
_TINY = 1e-30


@dataclass(frozen=True)
class CheckResult:
    """correct: max_rel_err <= tolerance (and, for logits, full argmax agreement where the margin is clear).
    argmax_agreement: fraction of clear-margin rows whose prediction matches (logits checks only)."""

    correct: bool
    max_rel_err: float
    argmax_agreement: float | None = None


def reference_copy(model: AUNN) -> AUNN:
    """A copy of ``model`` on the reference backend in fp32."""
    ref = copy.deepcopy(model)
    ref.backend, ref.precision = "reference", "fp32"
    return ref


def _chunks(model: AUNN, n: int) -> list[slice]:
    cfg = model.cfg
    size = max(1, _CHUNK_ELEMENTS // (cfg.bits + cfg.layers * cfg.hidden + cfg.vocab_size))
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _rel(diff: float, scale: float) -> float:
    return diff / max(scale, _TINY)


def check_logits(model: AUNN, idx: torch.Tensor, tolerance: float) -> CheckResult:
    """Logits of ``model(idx)`` and its ``predict(idx)`` (int64 [N]) against the reference argmax.

    Rows count for agreement when the reference's top-2 margin exceeds 2 * tolerance * max|ref|,
    i.e. when an error within tolerance could not flip the argmax."""
    ref = reference_copy(model)
    with torch.no_grad():
        logits = model(idx)
        pred = model.predict(idx)
        diff = scale = 0.0
        margins, ref_pred = [], []
        for part in _chunks(model, idx.numel()):
            z = ref(idx[part])
            diff = max(diff, float((logits[part] - z).abs().max()))
            scale = max(scale, float(z.abs().max()))
            top = z.topk(min(2, z.shape[-1]), dim=-1).values
            margins.append(top[:, 0] - top[:, -1])
            ref_pred.append(z.argmax(-1))
        clear = torch.cat(margins) > 2 * tolerance * scale
        agree = (pred == torch.cat(ref_pred))[clear]
    agreement = float(agree.float().mean()) if agree.numel() else 1.0
    err = _rel(diff, scale)
    return CheckResult(err <= tolerance and agreement == 1.0, err, agreement)


def check_loss(model: AUNN, idx: torch.Tensor, targets: torch.Tensor, tolerance: float) -> CheckResult:
    """Mean cross-entropy at int64 [N] indices and targets against the reference."""
    ref = reference_copy(model)
    with torch.no_grad():
        got = float(model.loss(idx, targets))
        want = sum(float(ref.loss(idx[p], targets[p])) * (p.stop - p.start) for p in _chunks(model, idx.numel()))
    want /= idx.numel()
    err = _rel(abs(got - want), abs(want))
    return CheckResult(err <= tolerance, err)


def check_grads(model: AUNN, idx: torch.Tensor, targets: torch.Tensor, tolerance: float) -> CheckResult:
    """Parameter gradients of one loss.backward() on identical copies of ``model``'s weights."""
    ref = reference_copy(model)
    mine = copy.deepcopy(model)
    mine.loss(idx, targets).backward()
    n = idx.numel()
    for part in _chunks(model, n):
        (ref.loss(idx[part], targets[part]) * ((part.stop - part.start) / n)).backward()
    err = 0.0
    for got, want in zip(mine.parameters(), ref.parameters()):
        if got.numel() == 0:
            continue
        if got.grad is None or want.grad is None:
            return CheckResult(False, float("inf"))
        err = max(err, _rel(float((got.grad - want.grad).abs().max()), float(want.grad.abs().max())))
    return CheckResult(err <= tolerance, err)


def check_graph_step(model: AUNN, idx: torch.Tensor, targets: torch.Tensor, tolerance: float) -> CheckResult:
    """The gradients as :func:`check_grads`, and one replay of the captured train step against one
    eager step of an identical model and optimizer on the same inputs: the loss, and each
    parameter's update by norm (a few near-zero gradients may flip an Adam update's sign)."""
    grads = check_grads(model, idx, targets, tolerance)
    eager, graphed = copy.deepcopy(model), copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-3)
    eager_opt = make_optimizer(eager, cfg)
    replay = GraphedTrainStep(graphed, make_optimizer(graphed, cfg), idx.numel())
    eager_opt.zero_grad(set_to_none=False)
    eager_loss = eager.loss(idx, targets)
    eager_loss.backward()
    eager_opt.step()
    graph_loss = replay(idx, targets)
    graph_loss, eager_loss = float(graph_loss.detach()), float(eager_loss.detach())
    err = _rel(abs(graph_loss - eager_loss), abs(eager_loss))
    with torch.no_grad():
        for start, after_eager, after_graph in zip(model.parameters(), eager.parameters(), graphed.parameters()):
            err = max(err, _rel(float((after_graph - after_eager).norm()), float((after_eager - start).norm())))
    return CheckResult(grads.correct and err <= tolerance, max(grads.max_rel_err, err))


def check(kind: str, model: AUNN, idx: torch.Tensor, targets: torch.Tensor, precision: str) -> CheckResult:
    """Run the check named by a workload's ``check`` field at the precision's tolerance."""
    tolerance = TOLERANCES[precision]
    if kind == "logits":
        return check_logits(model, idx, tolerance)
    if kind == "loss":
        return check_loss(model, idx, targets, tolerance)
    if kind == "grads":
        return check_grads(model, idx, targets, tolerance)
    if kind == "graph-step":
        return check_graph_step(model, idx, targets, tolerance)
    raise ValueError(f"unknown check {kind!r}")
