"""Tests of the cuda backend (the C++ extension's fused CUDA step, csrc/cuda/fused_step.cu).

On a GPU: logits, predictions, the loss and all eight gradients against the float64 reference by the Triton
kernels' "2x rule" in bf16 (tests/test_triton_kernels.py: error at most 2x, for gradients 4x, the float32
reference's own in the same precision plus the precision's floor), on random shapes with non-trivial biases and
gains, every output the operators allocate poisoned (NaN / the largest int64); opcheck of the operators.
Without a GPU: the backend refuses with a clear reason, and every csrc/cuda/*.cu compiles for sm_90a without
spills (CI's gate for the kernels nobody has run yet).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from test_triton_kernels import (
    GRAD_FLOOR_FP32,
    LOSS_ATOL,
    PRECISION_FLOOR,
    as_double,
    assert_2x_rule,
    differentiable_rounding,
    grads_of,
    row_term_scales,
    with_grad,
)

from aunn_fast import AUNN, AUNNConfig, AUNNParams, reference
from aunn_fast.backends import BACKENDS, resolve_backend
from aunn_fast.params import init_params

from helpers import check_compiled_model, random_indices, random_model

PRECISION = "bf16"
GPU = torch.device("cuda")
_REASON = BACKENDS["cuda"].unavailable_reason(GPU) if torch.cuda.is_available() else "needs a CUDA GPU"
needs_gpu = pytest.mark.skipif(_REASON is not None, reason=f"cuda backend unavailable: {_REASON}")
ops = torch.ops.aunn_fast


@pytest.fixture(autouse=True)
def poison_outputs():
    """Uninitialised memory filled with NaN (floats) / the largest value (integers): torch's deterministic mode
    (warn_only: the reference's ops need not have deterministic CUDA kernels)."""
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old[0])
    torch.utils.deterministic.fill_uninitialized_memory = old[1]


def make_params(cfg: AUNNConfig, generator: torch.Generator) -> AUNNParams:
    """Seed-model init with every tensor perturbed: non-trivial biases and gains."""
    base = init_params(cfg, generator)
    return AUNNParams(*[(t + 0.3 * torch.randn(t.shape, generator=generator)).to(GPU) for t in base])


def check_against_reference(cfg: AUNNConfig, n: int, generator: torch.Generator, reduction: str = "mean") -> None:
    """logits, argmax, the loss (``reduction``; "none" weighted per row) and all eight gradients against the
    oracle, bf16."""
    from aunn_fast import cuda_backend

    params = make_params(cfg, generator)
    idx = random_indices(n, cfg.bits, generator).to(GPU)
    targets = torch.randint(0, cfg.vocab_size, (n,), generator=generator).to(GPU)
    oracle_params = as_double(params)
    floor = PRECISION_FLOOR[PRECISION]

    got = cuda_backend.logits(idx, params, cfg, PRECISION)
    assert got.dtype == torch.float32 and got.shape == (n, cfg.vocab_size)
    oracle = reference.logits(idx, oracle_params, cfg, PRECISION)
    assert_2x_rule("logits", got, reference.logits(idx, params, cfg, PRECISION), oracle, atol_rel=floor)

    pred = cuda_backend.predict(idx, params, cfg, PRECISION)
    assert pred.dtype == torch.int64 and pred.shape == (n,)
    assert ((pred >= 0) & (pred < cfg.vocab_size)).all()
    if n:  # the chosen token's oracle logit is within a few times the logits' error of the row's best
        margin = 4 * (got.double() - oracle).abs().max().item() + 0.1 * floor * oracle.abs().max().item()
        assert (oracle.gather(1, pred[:, None])[:, 0] >= oracle.max(-1).values - margin).all()

    row_weights = torch.linspace(-1.0, 2.0, n, device=GPU)

    def run(p, loss_fn):
        p = with_grad(p)
        value = loss_fn(p)
        if reduction == "none":  # a different weight per row: the backward's general path
            value = (value * row_weights.to(value.dtype)).sum()
        value.backward()
        return value.detach(), grads_of(p)

    loss, grads = run(params, lambda p: cuda_backend.loss(idx, targets, p, cfg, PRECISION, reduction))
    if n == 0:  # as the other backends: the mean (and sum) of no rows is 0, with zero gradients
        assert loss.item() == 0.0 and all((g == 0).all() for g in grads)
        return
    with differentiable_rounding(round_grad=True):
        loss32, grads32 = run(params, lambda p: reference.loss(idx, targets, p, cfg, PRECISION, reduction))
    with differentiable_rounding(round_grad=False):
        loss64, grads64 = run(oracle_params, lambda p: reference.loss(idx, targets, p, cfg, PRECISION, reduction))
    assert loss.dtype == torch.float32
    rows_in_sum = 1 if reduction == "mean" else 2 * n
    assert_2x_rule("loss", loss, loss32, loss64, atol_rel=floor, atol=LOSS_ATOL * rows_in_sum)
    scale_of_sum = n if reduction == "sum" else 2 * n if reduction == "none" else 1
    scales = row_term_scales(idx, targets, oracle_params, cfg)
    for name, g, g32, g64, scale in zip(AUNNParams._fields, grads, grads32, grads64, scales):
        # factor 4: the kernel rounds both operands of every backward product, the reference only each result
        assert_2x_rule(
            f"d {name}", g, g32, g64, atol_rel=max(floor, GRAD_FLOOR_FP32), factor=4.0, scale=scale * scale_of_sum
        )


# ----------------------------------------------------------------------------- accuracy on the GPU

FIXED_CASES = [
    # hidden, layers, residual_every, bits, vocab, batch
    (64, 8, 2, 64, 4, 300),  # the seed model: 3 tiles of 128 rows, the last short
    (16, 2, 1, 64, 5, 37),  # no hidden layer
    (32, 3, 1, 20, 2, 1),  # one row, binary vocabulary
    (128, 5, 3, 64, 256, 97),  # the largest width and vocabulary: 4 vocabulary chunks, few warps per CTA
    (32, 12, 2, 1, 3, 50),  # a single bit, the deepest model
    (16, 4, 5, 7, 7, 0),  # residual_every beyond the hidden layers; an empty batch
    (16, 3, 1, 64, 17, 4097),  # vocabulary just past a 16-column tile; 33 tiles
    (64, 4, 2, 64, 70, 40000),  # more tiles than CTAs: each CTA loops over tiles and keeps its sums
]


@needs_gpu
@pytest.mark.parametrize("hidden,layers,residual_every,bits,vocab,batch", FIXED_CASES)
def test_against_reference(hidden, layers, residual_every, bits, vocab, batch, generator):
    cfg = AUNNConfig(vocab_size=vocab, hidden=hidden, layers=layers, bits=bits, residual_every=residual_every)
    check_against_reference(cfg, batch, generator)


@needs_gpu
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_against_reference(reduction, generator):
    cfg = AUNNConfig(vocab_size=11, hidden=32, layers=6, bits=64)
    check_against_reference(cfg, 130, generator, reduction)


@needs_gpu
@pytest.mark.parametrize("draw", range(6))
def test_random_shapes(draw, generator):
    """H in {16, 32, 64, 128}, layers 2-12, vocab 2-256, bits 1-64, residual_every 1-4, batch 0-4,097."""

    def pick(low, high):
        return int(torch.randint(low, high + 1, (), generator=generator))

    hidden = (16, 32, 64, 128)[pick(0, 3)]
    layers, vocab, bits, every, batch = pick(2, 12), pick(2, 256), pick(1, 64), pick(1, 4), pick(0, 4097)
    cfg = AUNNConfig(vocab_size=vocab, hidden=hidden, layers=layers, bits=bits, residual_every=every)
    print(cfg, batch)
    check_against_reference(cfg, batch, generator)


@needs_gpu
def test_logits_gradient_against_reference(generator):
    """The backward of the logits themselves (an arbitrary upstream gradient [N, V])."""
    from aunn_fast import cuda_backend

    cfg = AUNNConfig(vocab_size=9, hidden=32, layers=5, bits=64, residual_every=2)
    params, n = make_params(cfg, generator), 170
    idx = random_indices(n, cfg.bits, generator).to(GPU)
    upstream = torch.randn(n, cfg.vocab_size, generator=generator).to(GPU)

    def run(p, fn):
        p = with_grad(p)
        (fn(p) * upstream.to(p[0].dtype)).sum().backward()
        return grads_of(p)

    got = run(params, lambda p: cuda_backend.logits(idx, p, cfg, PRECISION))
    with differentiable_rounding(round_grad=True):
        ref32 = run(params, lambda p: reference.logits(idx, p, cfg, PRECISION))
    with differentiable_rounding(round_grad=False):
        oracle = run(as_double(params), lambda p: reference.logits(idx, p, cfg, PRECISION))
    for name, g, g32, g64 in zip(AUNNParams._fields, got, ref32, oracle):
        assert_2x_rule(f"d {name}", g, g32, g64, atol_rel=PRECISION_FLOOR[PRECISION], factor=4.0)


@needs_gpu
def test_argmax_ties_pick_the_first(generator):
    from aunn_fast import cuda_backend

    cfg = AUNNConfig(vocab_size=70, hidden=16, layers=3, bits=64)
    tied = torch.zeros(70, device=GPU)
    tied[[5, 9, 66]] = 1.0  # every row's logits: 1 at columns 5, 9 and 66, 0 elsewhere
    params = make_params(cfg, generator)._replace(out_weight=torch.zeros(70, 16, device=GPU), out_bias=tied)
    pred = cuda_backend.predict(random_indices(200, 64, generator).to(GPU), params, cfg, PRECISION)
    assert (pred == 5).all()


# ----------------------------------------------------------------------------- registration, compile, the model


@needs_gpu
def test_opcheck(generator):
    cfg = AUNNConfig(vocab_size=6, hidden=16, layers=4, bits=64)
    params = [p.requires_grad_() for p in make_params(cfg, generator)]
    idx = random_indices(9, 64, generator).to(GPU)
    targets = torch.randint(0, 6, (9,), generator=generator).to(GPU)
    settings = (cfg.residual_every, cfg.norm_eps)
    torch.library.opcheck(ops.cuda_logits, (idx, *params, *settings))
    torch.library.opcheck(ops.cuda_loss, (idx, targets, *params, *settings, True))
    torch.library.opcheck(ops.cuda_loss, (idx, targets, *params, *settings, False))
    frozen = [p.detach() for p in params]
    torch.library.opcheck(ops.cuda_argmax, (idx, *frozen, *settings))
    upstream = torch.randn(9, 6, generator=generator).to(GPU)
    torch.library.opcheck(ops.cuda_logits_backward, (upstream, idx, *frozen, *settings))
    unit = list(ops.cuda_loss(idx, targets, *frozen, *settings, True)[1])
    weights = torch.linspace(0.5, 1.5, 9, device=GPU)
    torch.library.opcheck(ops.cuda_loss_backward, (weights, unit, idx, targets, *frozen, *settings))


@needs_gpu
def test_uniform_upstream_scales_the_unit_gradients(generator):
    """The backward of a sum (an expanded upstream gradient) scales the forward's gradients; a per-row one runs
    the kernel again; both give the same gradients for the same weights."""
    cfg = AUNNConfig(vocab_size=6, hidden=16, layers=4, bits=64)
    frozen = list(make_params(cfg, generator))
    idx = random_indices(50, 64, generator).to(GPU)
    targets = torch.randint(0, 6, (50,), generator=generator).to(GPU)
    settings = (cfg.residual_every, cfg.norm_eps)
    unit = list(ops.cuda_loss(idx, targets, *frozen, *settings, True)[1])
    expanded = torch.full((1,), 0.25, device=GPU).expand(50)
    scaled = ops.cuda_loss_backward(expanded, unit, idx, targets, *frozen, *settings)
    rerun = ops.cuda_loss_backward(expanded.contiguous(), unit, idx, targets, *frozen, *settings)
    for a, b in zip(scaled, rerun):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_gpu
def test_model_and_compile_fullgraph(generator):
    cfg = AUNNConfig(vocab_size=5, hidden=32, layers=4, bits=64)
    model = random_model(cfg, generator, backend="cuda", precision=PRECISION).to(GPU)
    assert model.active_backend().name == "cuda"
    idx = random_indices(12, 64, generator).reshape(3, 4).to(GPU)
    targets = torch.randint(0, 5, (3, 4), generator=generator).to(GPU)
    check_compiled_model(model, idx, targets, tolerance=1e-6)


@needs_gpu
def test_unsupported_shapes_are_clear_errors():
    for cfg in (AUNNConfig(hidden=48, layers=3), AUNNConfig(hidden=256, layers=3), AUNNConfig(vocab_size=300)):
        model = AUNN(cfg, backend="cuda", precision=PRECISION).to(GPU)
        with pytest.raises(ValueError, match="cuda backend supports hidden widths 16, 32, 64, 128"):
            model(torch.tensor([1, 2], device=GPU))


@needs_gpu
def test_bad_input_is_refused_before_the_backend(monkeypatch):
    """The module's checks run before dispatch, so the cuda backend gives the other backends' errors."""
    from aunn_fast import cuda_backend

    monkeypatch.setattr(cuda_backend, "logits", lambda *a: pytest.fail("the backend ran"))
    model = AUNN(AUNNConfig(vocab_size=4, hidden=16, layers=3, bits=8), backend="cuda", precision=PRECISION).to(GPU)
    with pytest.raises(ValueError, match="past the model's largest index|out of range|largest"):
        model(torch.tensor([300], device=GPU))
    with pytest.raises(TypeError, match="indices must be int64"):
        model(torch.tensor([1.0], device=GPU))


# ----------------------------------------------------------------------------- without a GPU


def test_cuda_backend_refuses_on_the_cpu():
    assert BACKENDS["cuda"].unavailable_reason(torch.device("cpu")) == "the cuda backend runs on CUDA GPUs only"
    model = AUNN(AUNNConfig(hidden=16, layers=2), backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable on cpu: the cuda backend runs on CUDA"):
        model(torch.tensor([1, 2]))


def test_cuda_backend_is_bf16_only_and_never_auto(monkeypatch):
    """auto picks it nowhere (it has not passed on a GPU yet), even where it is available; bf16 is its one
    precision; unsupported widths and vocabularies are refused before any CUDA call."""
    from aunn_fast import cuda_backend

    assert BACKENDS["cuda"].precisions == ("bf16",)
    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda device: None)
    for device in ("cpu", "cuda"):
        assert resolve_backend("auto", device).name != "cuda"
    cfg = AUNNConfig(hidden=48, layers=3)
    params = init_params(cfg, torch.Generator())
    with pytest.raises(ValueError, match="hidden widths 16, 32, 64, 128 and vocabularies up to 256, got hidden 48"):
        cuda_backend.logits(torch.tensor([1]), params, cfg, "bf16")
    with pytest.raises(ValueError, match="bf16 only"):
        cuda_backend.loss(torch.tensor([1]), torch.tensor([0]), params, cfg, "fp32")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_every_cuda_kernel_compiles_for_hopper_without_spills(tmp_path):
    """compile_check --cuda: every csrc/cuda/*.cu compiles for sm_90a, no kernel spills or exceeds the H100's
    shared memory, and the fused step has its 20 kernels (4 widths x 5 modes)."""
    from aunn_fast.bench import cuda_compile_check

    table = tmp_path / "cuda.md"
    assert cuda_compile_check.main(["--out", str(table)]) == 0, table.read_text() if table.exists() else ""
    rows = [
        dict(zip(cuda_compile_check.COLUMNS, (c.strip() for c in line.split("|")[1:-1])))
        for line in table.read_text().splitlines()[2:]
    ]
    bad = [f"{r['file']} {r['kernel']}: {r['verdict']}" for r in rows if r["verdict"] != "ok"]
    assert not bad, "\n".join(bad)
    fused = [r for r in rows if r["file"] == "fused_step.cu"]
    assert len(fused) == 20 and all(0 < int(r["registers"]) <= 255 for r in fused)
