"""Tests of the wide-model CUDA path (csrc/cuda/wide_*, aunn_fast.cuda_wide) against the PyTorch reference.

On a GPU: logits, predictions, the loss in every reduction and all eight gradients against the float64 oracle by
the "2x rule" of tests/test_triton_kernels.py in bf16 (the oracle rounds the same operands to bf16; gradients
with a factor 4, the kernels rounding both operands of every backward product), on perturbed biases and gains,
with every buffer the operators allocate poisoned (NaN), and torch.library's opcheck. Without a GPU only the
compile check runs: every kernel of wide_*.cu compiles for sm_90a, with torch's extension flags, without spills.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from test_triton_kernels import (
    LOSS_ATOL,
    PRECISION_FLOOR,
    as_double,
    assert_2x_rule,
    differentiable_rounding,
    grads_of,
    row_term_scales,
    with_grad,
)

from aunn_fast import AUNNConfig, AUNNParams, reference
from aunn_fast.cpp_build import source_dir
from aunn_fast.params import init_params

from helpers import random_indices, rel_err

WIDE_SOURCES = sorted((source_dir() / "cuda").glob("wide_*.cu")) if source_dir() is not None else []


def _unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    from aunn_fast import cuda_wide

    return cuda_wide.unavailable_reason(torch.device("cuda"))


_REASON = _unavailable()
needs_gpu = pytest.mark.skipif(_REASON is not None, reason=f"wide CUDA path unavailable: {_REASON}")
FLOOR = PRECISION_FLOOR["bf16"]


def make_params(cfg: AUNNConfig, generator: torch.Generator) -> AUNNParams:
    """Seed-model init with every tensor perturbed (non-trivial biases and gains), on the GPU."""
    base = init_params(cfg, generator)
    return AUNNParams(*[(t + 0.3 * torch.randn(t.shape, generator=generator)).cuda() for t in base])


def check_against_reference(cfg: AUNNConfig, n: int, generator: torch.Generator, reduction: str = "mean") -> None:
    """logits, argmax, the loss (``reduction``) and all eight gradients of the wide path against the oracle."""
    from aunn_fast import cuda_wide

    params = make_params(cfg, generator)
    idx = random_indices(n, cfg.bits, generator).cuda()
    targets = torch.randint(0, cfg.vocab_size, (n,), generator=generator).cuda()
    oracle_params = as_double(params)

    got = cuda_wide.logits(idx, params, cfg, poison=True)
    assert got.dtype == torch.float32 and got.shape == (n, cfg.vocab_size)
    oracle = reference.logits(idx, oracle_params, cfg, "bf16")
    assert_2x_rule("logits", got, reference.logits(idx, params, cfg, "bf16"), oracle, atol_rel=FLOOR)
    if oracle.numel() >= 64:  # the operands were rounded to bf16: nearer this oracle than to the unrounded one
        assert rel_err(got, oracle) < 0.5 * rel_err(reference.logits(idx, oracle_params, cfg, "fp32"), oracle)

    pred = cuda_wide.predict(idx, params, cfg, poison=True)
    assert pred.dtype == torch.int64 and pred.shape == (n,)
    if n:  # the chosen token's oracle logit is within a few times the logits' error of the row's best
        margin = 4 * (got.double() - oracle).abs().max().item() + 0.1 * FLOOR * oracle.abs().max().item()
        assert (oracle.gather(1, pred[:, None])[:, 0] >= oracle.max(-1).values - margin).all()

    weights = torch.linspace(-1.0, 2.0, n, device="cuda")  # "none": a different upstream gradient per row

    def run(p, loss_fn):
        p = with_grad(p)
        value = loss_fn(idx, targets, p, cfg, reduction)
        if reduction == "none":
            value = (value * weights.to(value.dtype)).sum()
        value.backward()
        return value.detach(), grads_of(p)

    loss, grads = run(params, lambda *a: cuda_wide.loss(*a[:4], "bf16", a[4], poison=True))
    if n == 0:  # the mean (and sum) of no rows is 0, with zero gradients
        assert loss.item() == 0.0 and all((g == 0).all() for g in grads)
        return
    with differentiable_rounding(round_grad=True):
        loss32, grads32 = run(params, lambda i, t, p, c, r: reference.loss(i, t, p, c, "bf16", r))
    with differentiable_rounding(round_grad=False):
        loss64, grads64 = run(oracle_params, lambda i, t, p, c, r: reference.loss(i, t, p, c, "bf16", r))
    assert loss.dtype == torch.float32
    rows = 1 if reduction == "mean" else 2 * n
    assert_2x_rule("loss", loss, loss32, loss64, atol_rel=FLOOR, atol=LOSS_ATOL * rows)
    scale_of_sum = n if reduction == "sum" else 2 * n if reduction == "none" else 1
    scales = row_term_scales(idx, targets, oracle_params, cfg)
    for name, g, g32, g64, scale in zip(AUNNParams._fields, grads, grads32, grads64, scales):
        assert_2x_rule(f"d {name}", g, g32, g64, atol_rel=FLOOR, factor=4.0, scale=scale * scale_of_sum)


CASES = [
    # hidden, layers, residual_every, bits, vocab, batch
    (256, 2, 2, 64, 2, 1),  # no hidden layer, binary vocab, one row
    (256, 4, 2, 64, 5, 130),  # the seed layout, a short last row tile
    (512, 8, 2, 64, 4, 2048),  # the seed notebook's model and batch (the 200 us goal)
    (1024, 3, 1, 64, 300, 257),  # the widest, a residual every layer, vocab over five column tiles
    (512, 12, 3, 40, 70, 4097),  # the deepest, residual_every 3, bits < 64, the largest batch
    (320, 5, 2, 7, 7, 100),  # hidden not a multiple of the 64-column tile, few bits
    (256, 5, 9, 64, 3, 33),  # residual_every beyond the hidden layers: no residual add at all
    (512, 4, 2, 64, 6, 0),  # an empty batch
]


@needs_gpu
@pytest.mark.parametrize("hidden,layers,residual_every,bits,vocab,batch", CASES)
def test_against_reference(hidden, layers, residual_every, bits, vocab, batch, generator):
    cfg = AUNNConfig(vocab_size=vocab, hidden=hidden, layers=layers, bits=bits, residual_every=residual_every)
    check_against_reference(cfg, batch, generator)


@needs_gpu
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_against_reference(reduction, generator):
    cfg = AUNNConfig(vocab_size=9, hidden=256, layers=5, bits=64)
    check_against_reference(cfg, 300, generator, reduction)


@needs_gpu
def test_forward_only_calls_run_in_slices(generator):
    """logits, predict and a loss without gradients run in slices of 16,384 rows (wide_bindings.cpp): across a
    slice boundary every row is still the reference's."""
    from aunn_fast import cuda_wide

    cfg = AUNNConfig(vocab_size=5, hidden=256, layers=3)
    params = make_params(cfg, generator)
    n = 16384 + 77
    idx = random_indices(n, cfg.bits, generator).cuda()
    targets = torch.randint(0, cfg.vocab_size, (n,), generator=generator).cuda()
    oracle_params = as_double(params)
    got = cuda_wide.logits(idx, params, cfg, poison=True)
    oracle = reference.logits(idx, oracle_params, cfg, "bf16")
    assert_2x_rule("logits", got, reference.logits(idx, params, cfg, "bf16"), oracle, atol_rel=FLOOR)
    assert torch.equal(cuda_wide.predict(idx, params, cfg, poison=True), got.argmax(-1))
    with torch.no_grad():
        rows = cuda_wide.loss(idx, targets, params, cfg, reduction="none", poison=True)
    oracle_rows = reference.loss(idx, targets, oracle_params, cfg, "bf16", "none")
    ref_rows = reference.loss(idx, targets, params, cfg, "bf16", "none")
    assert_2x_rule("row losses", rows, ref_rows, oracle_rows, atol_rel=FLOOR, atol=LOSS_ATOL)


@needs_gpu
def test_logits_gradient_against_reference(generator):
    """logits() backward from an arbitrary dL/dlogits (cuda_wide_logits_backward)."""
    from aunn_fast import cuda_wide

    cfg = AUNNConfig(vocab_size=11, hidden=512, layers=5, bits=64)
    params = make_params(cfg, generator)
    idx = random_indices(200, cfg.bits, generator).cuda()
    upstream = torch.randn(200, cfg.vocab_size, generator=generator).cuda()

    def run(p, fn):
        p = with_grad(p)
        (fn(p) * upstream.to(p.in_weight.dtype)).sum().backward()
        return grads_of(p)

    grads = run(params, lambda p: cuda_wide.logits(idx, p, cfg, poison=True))
    with differentiable_rounding(round_grad=True):
        grads32 = run(params, lambda p: reference.logits(idx, p, cfg, "bf16"))
    with differentiable_rounding(round_grad=False):
        grads64 = run(as_double(params), lambda p: reference.logits(idx, p, cfg, "bf16"))
    scales = logits_row_term_scales(idx, upstream, as_double(params), cfg)
    for name, g, g32, g64, scale in zip(AUNNParams._fields, grads, grads32, grads64, scales):
        assert_2x_rule(f"d {name}", g, g32, g64, atol_rel=FLOOR, factor=4.0, scale=scale)


def logits_row_term_scales(idx, upstream, params64: AUNNParams, cfg: AUNNConfig) -> list[float]:
    """Per parameter, max over its elements of the sum over rows of |d(upstream[r] . logits[r])/dθ| (float64):
    the size of the terms the batch-reduced gradient sums (as row_term_scales for the loss)."""

    def row_value(p, i, u):
        return (reference.logits(i[None], AUNNParams(*p), cfg, "fp32")[0] * u).sum()

    row_grads = torch.func.vmap(torch.func.grad(row_value), in_dims=(None, 0, 0))
    totals = [torch.zeros_like(p) for p in params64]
    for i, u in zip(idx.split(64), upstream.double().split(64)):
        for total, g in zip(totals, row_grads(tuple(params64), i, u)):
            total += g.abs().sum(0)
    return [t.max().item() if t.numel() else 0.0 for t in totals]


@needs_gpu
def test_opcheck(generator):
    cfg = AUNNConfig(vocab_size=6, hidden=256, layers=4, bits=64)
    params = [p.requires_grad_() for p in make_params(cfg, generator)]
    idx = random_indices(9, cfg.bits, generator).cuda()
    targets = torch.randint(0, 6, (9,), generator=generator).cuda()
    settings = (cfg.residual_every, cfg.norm_eps)
    ops = torch.ops.aunn_fast
    torch.library.opcheck(ops.cuda_wide_logits, (idx, *params, *settings, True))
    for reduction, with_grads in (("mean", True), ("sum", False), ("none", False)):
        torch.library.opcheck(ops.cuda_wide_loss, (idx, targets, *params, *settings, reduction, with_grads, True))
    frozen = [p.detach() for p in params]
    torch.library.opcheck(ops.cuda_wide_argmax, (idx, *frozen, *settings, True))
    upstream = torch.randn(9, 6, generator=generator).cuda()
    torch.library.opcheck(ops.cuda_wide_logits_backward, (upstream, idx, *frozen, *settings, True))
    torch.library.opcheck(
        ops.cuda_wide_loss_backward, (torch.full((9,), 0.5).cuda(), idx, targets, *frozen, *settings, True)
    )


def test_settings_are_refused_before_any_work():
    """Runs anywhere: the Python side refuses other precisions, float64 parameters and unknown reductions itself,
    and says why it is unavailable off a GPU."""
    from aunn_fast import cuda_wide

    cfg = AUNNConfig(vocab_size=4, hidden=256, layers=3)
    params = init_params(cfg)
    idx = torch.arange(5)
    assert "CUDA devices only" in cuda_wide.unavailable_reason(torch.device("cpu"))
    with pytest.raises(ValueError, match="bf16 only"):
        cuda_wide.logits(idx, params, cfg, "fp32")
    with pytest.raises(TypeError, match="float32 parameters, got in_weight torch.float64"):
        cuda_wide.predict(idx, params._replace(in_weight=params.in_weight.double()), cfg)
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        cuda_wide.loss(idx, idx % 4, params, cfg, reduction="max")


@needs_gpu
def test_bad_input_is_a_clear_error(generator):
    from aunn_fast import cuda_wide

    cfg = AUNNConfig(vocab_size=4, hidden=256, layers=3)
    params = make_params(cfg, generator)
    idx = random_indices(5, cfg.bits, generator).cuda()
    with pytest.raises(RuntimeError, match="idx must be a contiguous int64 CUDA vector"):
        cuda_wide.logits(idx.cpu(), params, cfg)
    with pytest.raises(RuntimeError, match="targets has 4 rows"):
        cuda_wide.loss(idx, idx[:4] % 4, params, cfg)


# ----------------------------------------------------------------------------- no GPU needed

# torch.utils.cpp_extension compiles .cu files with these: no implicit bf16/half conversions
TORCH_NVCC_DEFINES = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_kernels_compile_for_hopper_without_spills(tmp_path):
    """Every kernel of the wide path compiles for sm_90a with torch's extension flags, spills nothing and fits
    an H100's shared memory (the table in WIDE.md comes from `python -m aunn_fast.bench.compile_check --cuda`).
    The files compile concurrently (CI has two cores)."""
    from aunn_fast.bench import cuda_compile_check

    assert {p.name for p in WIDE_SOURCES} == {"wide_forward.cu", "wide_backward.cu"}
    runs = [
        subprocess.Popen(
            ["nvcc", "-arch=sm_90a", "-cubin", "-O3", "-Xptxas", "-v", *TORCH_NVCC_DEFINES]
            + ["-o", str(tmp_path / f"{source.stem}.cubin"), str(source)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for source in WIDE_SOURCES
    ]
    for source, run in zip(WIDE_SOURCES, runs):
        report = run.communicate()[0]
        assert run.returncode == 0, f"{source.name}: {report[-3000:]}"
        kernels = cuda_compile_check.parse_ptxas(report)
        assert any("product_kernel" in str(k["kernel"]) for k in kernels), f"{source.name}: no product compiled"
        bad = [k for k in kernels if cuda_compile_check.verdict(k) != "ok"]
        assert not bad, f"{source.name}: {bad}"
