"""Correctness of a provider against the fp32 reference on the same weights and inputs.

Errors are normwise relative: ``max|x - ref| / max|ref|`` over a whole tensor
(for gradients, the largest such value over the parameter tensors). The
reference is evaluated in chunks so a big batch costs one chunk of extra memory.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from aunn_fast import AUNN

# Largest accepted relative error by precision.
TOLERANCES: dict[str, float] = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 5e-2}
# Smallest error a reduced precision leaves against the fp32 reference (its measured effect is ~1e-3 on
# logits and losses in bf16, ~1e-4 in tf32, more on gradients): below it, the precision was ignored.
PRECISION_EFFECT_FLOOR: dict[str, float] = {"tf32": 1e-6, "bf16": 1e-5}
STEPS = 2  # steps of a training workload the check replays
UPDATE_TOLERANCE = 0.2  # of a parameter's total change: 1 - cosine, and |log| of the norm ratio

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
    # counted in integers: a float32 mean of 16M ones on CUDA came out 0.99999994
    disagreeing = int((~agree).sum())
    agreement = 1.0 - disagreeing / agree.numel() if agree.numel() else 1.0
    err = _rel(diff, scale)
    return CheckResult(err <= tolerance and disagreeing == 0, err, agreement)


def check_loss(model: AUNN, idx: torch.Tensor, targets: torch.Tensor, tolerance: float) -> CheckResult:
    """Each row's cross-entropy at int64 [N] indices and targets, and their mean, against the reference
    (a mean alone would pass a loss computed from part of the batch)."""
    ref = reference_copy(model)
    with torch.no_grad():
        rows, mean = model.loss(idx, targets, reduction="none"), float(model.loss(idx, targets))
        want = torch.cat([ref.loss(idx[p], targets[p], reduction="none") for p in _chunks(model, idx.numel())])
    err = max(
        _rel(float((rows - want).abs().max()), float(want.abs().max())),
        _rel(abs(mean - float(want.double().mean())), float(want.double().mean().abs())),
    )
    return CheckResult(err <= tolerance, err)


def check_steps(
    prepare: Callable[[AUNN, int, torch.Generator], Any], model: AUNN, batch: int, seed: int, tolerance: float
) -> CheckResult:
    """The workload's own step, ``prepare(model, batch, generator).step``, run STEPS times on ``model`` and
    on its fp32 reference copy with the same inputs, so that what the provider carries from one step to the
    next (weights it cached, gradients it kept) is checked too. Every step starts both from the provider's
    weights (the reference copy takes them after each step), so that their gradients differ by the
    provider's error alone: an Adam step moves each weight by about lr whatever the size of its gradient,
    and a rounding-level difference in a near-zero gradient may send it either way. Left on its own
    trajectory, PyTorch's fp32 step at the bpe configuration differed from float64's by 2.7e-6 in its first
    gradients and 4.2e-5 in its second (1.2e-6 from the same weights), and the fused fp32 step failed the
    check on the H100 at 1.5e-4. After every step, each parameter's gradient; summed over the steps, each
    parameter's updates must point the same way (cosine >= 1 - UPDATE_TOLERANCE) with a norm within a
    factor e^UPDATE_TOLERANCE (a few Adam updates of near-zero gradients may flip sign). The error reported
    is the gradients'. That each workload's step is the eager step it claims to be (zero_grad, backward,
    one optimizer step) is tested in tests/test_bench.py."""
    ref = reference_copy(model)
    device = next(model.parameters()).device
    steps = [prepare(m, batch, torch.Generator(device=device).manual_seed(seed)).step for m in (model, ref)]
    start = [p.detach().clone() for p in model.parameters()]
    # per parameter, the reference's updates less the provider's, summed over the steps (each pair of
    # updates from the same weights): the reference's total change is the provider's plus this
    apart = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    err = 0.0
    for _ in range(STEPS):
        for step in steps:
            step()
        for got, want in zip(model.parameters(), ref.parameters()):
            if got.numel() == 0:
                continue
            if got.grad is None or want.grad is None:
                return CheckResult(False, float("inf"))
            err = max(err, _rel(float((got.grad - want.grad).abs().max()), float(want.grad.abs().max())))
        with torch.no_grad():
            for got, want, difference in zip(model.parameters(), ref.parameters(), apart):
                difference += (want - got).double()
                want.copy_(got)
    moved_as_expected = True
    with torch.no_grad():
        for before, got, difference in zip(start, model.parameters(), apart):
            moved = (got - before).double().flatten()
            expected = moved + difference.flatten()
            if expected.norm() == 0:
                moved_as_expected &= bool(moved.norm() == 0)
                continue
            cosine = float(moved @ expected / (moved.norm() * expected.norm()).clamp_min(_TINY))
            ratio = float(moved.norm() / expected.norm())
            moved_as_expected &= cosine >= 1 - UPDATE_TOLERANCE and abs(math.log(max(ratio, _TINY))) <= UPDATE_TOLERANCE
    return CheckResult(err <= tolerance and moved_as_expected, err)


def check(kind: str, model: AUNN, idx: torch.Tensor, targets: torch.Tensor, precision: str) -> CheckResult:
    """Run a forward check ("logits" or "loss") at the precision's tolerance."""
    tolerance = TOLERANCES[precision]
    if kind == "logits":
        return check_logits(model, idx, tolerance)
    if kind == "loss":
        return check_loss(model, idx, targets, tolerance)
    raise ValueError(f"unknown check {kind!r}")


def honours(result: CheckResult, precision: str) -> CheckResult:
    """``result``, failed where a reduced precision left no trace (an error below PRECISION_EFFECT_FLOOR):
    such a provider did not compute in the precision it reports."""
    if result.max_rel_err < PRECISION_EFFECT_FLOOR.get(precision, 0.0):
        return replace(result, correct=False)
    return result
