"""The benchmark's correctness checks, ratios, input rotation, timing and report catch subtle faults, not
only grossly wrong providers (each test was seen to fail on a deliberately broken copy of the code)."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from aunn_fast import AUNNConfig, reference
from aunn_fast.backends import BACKENDS, Backend
from aunn_fast.bench import checks, harness, report, timing, workloads
from aunn_fast.bench.configs import Case
from aunn_fast.config import PRECISIONS

TINY = AUNNConfig(vocab_size=4, hidden=16, layers=3, bits=64)
WIDE_VOCAB = AUNNConfig(vocab_size=64, hidden=16, layers=3, bits=64)


def _always(device):
    return None


def _add(monkeypatch, name, logits=reference.logits, loss=reference.loss, predict=reference.predict):
    monkeypatch.setitem(BACKENDS, name, Backend(name, logits, loss, predict, PRECISIONS, _always))


def _model(cfg, backend):
    model = harness.nontrivial_model(cfg, seed=3)
    model.backend = backend
    return model


def _flip_predict(low: float, high: float):
    """The reference's argmax, except the runner-up on rows whose top-2 margin lies in [low, high) * max|logits|."""

    def predict(idx, params, cfg, precision="fp32"):
        z = reference.logits(idx, params, cfg, "fp32")
        top = z.topk(2, dim=-1)
        margin = top.values[:, 0] - top.values[:, 1]
        scale = z.abs().max()
        flip = (margin >= low * scale) & (margin < high * scale)
        return torch.where(flip, top.indices[:, 1], top.indices[:, 0])

    return predict


def _flipped_rows(model, idx, low, high):
    ref = checks.reference_copy(model)
    with torch.no_grad():
        z = ref(idx)
    top = z.topk(2, dim=-1).values
    margin = top[:, 0] - top[:, 1]
    scale = z.abs().max()
    return int(((margin >= low * scale) & (margin < high * scale)).sum())


IDX = torch.randint(0, 2**62, (4096,), generator=torch.Generator().manual_seed(0))


def test_logits_check_flags_predictions_that_flip_clear_margin_rows(monkeypatch):
    """predict wrong on rows whose margin is clear (> 2 tol) but small (< 0.01): incorrect."""
    tol = checks.TOLERANCES["fp32"]
    _add(monkeypatch, "flipclear", predict=_flip_predict(4 * tol, 1e-2))
    model = _model(WIDE_VOCAB, "flipclear")
    assert _flipped_rows(model, IDX, 4 * tol, 1e-2) > 0
    result = checks.check_logits(model, IDX, tol)
    assert result.max_rel_err < tol  # the logits themselves are exact
    assert result.argmax_agreement < 1.0 and not result.correct


def test_logits_check_forgives_flips_on_rows_within_tolerance(monkeypatch):
    """predict that differs only on near-ties (margin < 2 tol * scale) is still correct."""
    tol = checks.TOLERANCES["bf16"]
    _add(monkeypatch, "fliptie", predict=_flip_predict(0.0, tol))
    model = _model(WIDE_VOCAB, "fliptie")
    assert _flipped_rows(model, IDX, 0.0, tol) > 0
    result = checks.check_logits(model, IDX, tol)
    assert result.correct and result.argmax_agreement == 1.0


def test_logits_error_is_relative_to_the_reference(monkeypatch):
    """logits doubled: max|2z - z| / max|z| = 1 exactly (not 0.5, relative to the provider)."""

    def doubled(idx, params, cfg, precision="fp32"):
        return 2 * reference.logits(idx, params, cfg, precision)

    _add(monkeypatch, "double", logits=doubled)
    result = checks.check_logits(_model(TINY, "double"), IDX[:256], checks.TOLERANCES["fp32"])
    assert result.max_rel_err == pytest.approx(1.0, rel=1e-5)


def test_loss_check_applies_the_fp32_tolerance(monkeypatch):
    """A loss off by a relative 1e-3 fails fp32 (tolerance 1e-4)."""

    def loss(idx, targets, params, cfg, precision="fp32", reduction="mean"):
        return reference.loss(idx, targets, params, cfg, precision, reduction) * (1 + 1e-3)

    _add(monkeypatch, "offloss", loss=loss)
    model = _model(TINY, "offloss")
    targets = torch.randint(0, 4, (256,), generator=torch.Generator().manual_seed(1))
    result = checks.check_loss(model, IDX[:256], targets, checks.TOLERANCES["fp32"])
    assert result.max_rel_err == pytest.approx(1e-3, rel=1e-2) and not result.correct


def test_step_check_compares_every_parameters_gradient(monkeypatch):
    """The last parameter's gradient 1% off (the update hardly changes under Adam): incorrect."""

    def prepare(model, batch, generator):
        if model.backend == "reference":
            return workloads.WORKLOADS["train"].prepare(model, batch, generator)
        optimizer = workloads.benchmark_optimizer(model, "adamw")
        sets = workloads.input_sets(model.cfg, batch, generator)
        cycle = itertools.cycle(sets)  # the same inputs, in the same order, as the workload's own step

        def step():
            optimizer.zero_grad(set_to_none=True)
            model.loss(*next(cycle)).backward()
            list(model.parameters())[-1].grad.mul_(1.01)
            optimizer.step()

        return workloads.Prepared(step, *sets[0])

    # the reference side uses the same inputs: both draw input_sets first from the same seeded generator
    _add(monkeypatch, "gradoff")
    model = _model(TINY, "gradoff")
    result = checks.check_steps(prepare, model, 64, seed=5, tolerance=checks.TOLERANCES["fp32"])
    assert result.max_rel_err > 5e-3 and not result.correct


def test_step_check_compares_gradients_at_the_providers_own_weights(monkeypatch):
    """Exact gradients, but the Adam updates of near-zero gradients (below 1% of the largest) go the other
    way, as a rounding-level difference in such a gradient may send them: an Adam step moves a weight by
    about lr whatever its gradient's size. The second step's gradients, taken at the provider's weights,
    must still match (on its own trajectory the reference's differed by ~1e-3; on the H100 PyTorch's own
    fp32 step at the bpe configuration failed the check that way), and the updates still point the same way."""

    def prepare(model, batch, generator):
        if model.backend == "reference":
            return workloads.WORKLOADS["train"].prepare(model, batch, generator)
        optimizer = workloads.benchmark_optimizer(model, "adamw")
        sets = workloads.input_sets(model.cfg, batch, generator)
        cycle = itertools.cycle(sets)

        def step():
            optimizer.zero_grad(set_to_none=True)
            model.loss(*next(cycle)).backward()
            exact = [p.grad.clone() for p in model.parameters()]
            for p in model.parameters():
                near_zero = p.grad.abs() < 1e-2 * p.grad.abs().max()
                p.grad[near_zero] *= -1
            optimizer.step()
            for p, g in zip(model.parameters(), exact):
                p.grad.copy_(g)

        return workloads.Prepared(step, *sets[0])

    _add(monkeypatch, "nearzero")
    model = _model(TINY, "nearzero")
    result = checks.check_steps(prepare, model, 64, seed=5, tolerance=checks.TOLERANCES["fp32"])
    assert result.max_rel_err < 1e-6 and result.correct


def test_step_check_sees_an_update_that_was_not_applied(monkeypatch):
    """Right gradients, no optimizer step: with one replayed step only the parameter change can tell."""
    monkeypatch.setattr(checks, "STEPS", 1)

    def prepare(model, batch, generator):
        prepared = workloads.WORKLOADS["train"].prepare(model, batch, generator)
        if model.backend == "reference":
            return prepared

        def step():
            model.zero_grad(set_to_none=True)
            model.loss(prepared.idx, prepared.targets).backward()  # the optimizer step is forgotten

        return workloads.Prepared(step, prepared.idx, prepared.targets)

    _add(monkeypatch, "nostep")
    model = _model(TINY, "nostep")
    result = checks.check_steps(prepare, model, 64, seed=5, tolerance=checks.TOLERANCES["fp32"])
    assert result.max_rel_err < 1e-6  # the gradients agree
    assert not result.correct


def _row(provider, precision, batch, ms):
    return {
        "provider": provider,
        "workload": "predict",
        "config": "seed",
        "batch": batch,
        "precision": precision,
        "ms": ms,
        "correct": True,
        "vs_eager": None,
        "vs_compile": None,
    }


def test_ratios_use_the_fp32_baseline_at_the_same_batch():
    rows = [
        _row("reference", "fp32", 8, 10.0),
        _row("reference", "bf16", 8, 5.0),
        _row("fast", "bf16", 8, 2.0),
        _row("reference", "fp32", 64, 40.0),
        _row("fast", "bf16", 64, 4.0),
    ]
    harness.add_ratios(rows)
    assert rows[2]["vs_eager"] == 5.0 and rows[4]["vs_eager"] == 10.0


def test_a_cuda_only_workload_on_cpu_is_skipped_with_the_reason():
    """"""
    rows = harness.run(
        [Case("tiny", TINY, "train-graph", (64,))],
        harness.Options(torch.device("cpu"), ["reference"], quick=True),
        log=lambda line: None,
    )
    assert [r["skipped"] for r in rows] == ["this workload needs a CUDA device"]
    assert rows[0]["error"] is None


def test_steps_rotate_through_several_input_sets():
    """"""
    model = harness.nontrivial_model(TINY, seed=3)
    seen = []
    original = model.predict
    model.predict = lambda idx: seen.append(idx.clone()) or original(idx)
    step = workloads.WORKLOADS["predict"].prepare(model, 64, torch.Generator().manual_seed(7)).step
    for _ in range(workloads.MAX_INPUT_SETS):
        step()
    assert len({tuple(i.tolist()) for i in seen}) == workloads.MAX_INPUT_SETS


def test_cpu_timing_is_a_median_not_a_minimum():
    """"""
    delays = iter([0.0, 0.001, 0.03, 0.03])  # warm-up, then three samples
    budget = timing.Budget(min_reps=3, max_reps=3, min_ms=0.0, warmup_ms=1, rep_ms=1, stretch_steps=1)
    ms = timing.median_ms(lambda: time.sleep(next(delays)), torch.device("cpu"), budget)
    assert ms >= 25.0


def test_incorrect_rows_read_incorrect_in_the_markdown_table():
    """"""
    row = dict(
        harness._blank_row("wrong", Case("tiny", TINY, "predict", (64,)), 64, "fp32"),
        correct=False,
        max_rel_err=0.5,
        first_call_s=0.1,
    )
    lines = report.workload_table("predict", [row], with_ceilings=False)
    assert any("INCORRECT" in line for line in lines)
