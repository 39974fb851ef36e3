"""Tests of the cpp backend (the C++ extension's fused CPU AUNN) against the PyTorch reference.

The accuracy criterion is the Triton kernels' "2x rule" (see tests/test_triton_kernels.py): per output, the
error against the float64 oracle is at most twice the float32 reference's own plus a floor of ~100 float32
ulps of the tensor's scale. Outputs are poisoned (every uninitialised tensor the operators allocate is NaN
or the largest int64), so an unwritten element fails. Skipped, with the reason, where the extension cannot
be built (no compiler, AUNN_FAST_CPP=0).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_triton_kernels import (
    ATOL_REL,
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

from helpers import check_compiled_model, random_indices, random_model, rel_err

CPU = torch.device("cpu")
_REASON = BACKENDS["cpp"].unavailable_reason(CPU)
needs_extension = pytest.mark.skipif(_REASON is not None, reason=f"cpp backend unavailable: {_REASON}")
_BF16_REASON = _REASON or BACKENDS["cpp"].precision_unavailable("bf16")
needs_bf16 = pytest.mark.skipif(_BF16_REASON is not None, reason=f"cpp bf16 unavailable: {_BF16_REASON}")
PRECISIONS = ["fp32", pytest.param("bf16", marks=needs_bf16)]
ops = torch.ops.aunn_fast


@pytest.fixture(autouse=True)
def poison_outputs():
    """Uninitialised memory filled with NaN (floats) / the largest value (integers): torch's deterministic mode."""
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old[0])
    torch.utils.deterministic.fill_uninitialized_memory = old[1]


@pytest.fixture
def threads(request):
    """torch's intra-op threads set to the parameter for the test (the cpp backend splits blocks of rows, and
    the gradients' sum and update, among them), restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def make_params(cfg: AUNNConfig, generator: torch.Generator) -> AUNNParams:
    """Seed-model init with every tensor perturbed: non-trivial biases and gains."""
    return AUNNParams(*[t + 0.3 * torch.randn(t.shape, generator=generator) for t in init_params(cfg, generator)])


def make_indices(cfg: AUNNConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """Valid indices over the model's whole range (at 64 bits, 0 .. 2**63 - 1), its largest included."""
    return random_indices(n, cfg.bits, generator)


def check_against_reference(
    cfg: AUNNConfig, n: int, generator: torch.Generator, reduction: str = "mean", precision: str = "fp32"
) -> None:
    """logits, argmax, the loss (``reduction``) and all eight gradients of the cpp backend against the oracle, in
    ``precision``. bf16 as tests/test_triton_kernels.py checks it: the oracle rounds the same operands, its
    float32 reference also rounds the gradients through them (as a reduced-precision backward does), and
    gradients get a factor of 4 (both operands of every backward product are rounded)."""
    from aunn_fast import cpp_backend

    params = make_params(cfg, generator)
    idx = make_indices(cfg, n, generator)
    targets = torch.randint(0, cfg.vocab_size, (n,), generator=generator)
    oracle_params = as_double(params)
    floor = PRECISION_FLOOR[precision]

    got = cpp_backend.logits(idx, params, cfg, precision)
    oracle = reference.logits(idx, oracle_params, cfg, precision)
    assert_2x_rule("logits", got, reference.logits(idx, params, cfg, precision), oracle, atol_rel=floor)
    if precision != "fp32" and oracle.numel() >= 64:  # the operands were rounded: nearer this oracle than fp32's
        assert rel_err(got, oracle) < 0.5 * rel_err(reference.logits(idx, oracle_params, cfg), oracle)

    pred = cpp_backend.predict(idx, params, cfg, precision)
    assert pred.dtype == torch.int64 and pred.shape == (n,)
    if n:  # the chosen token's oracle logit is within a few times the logits' error of the row's best
        margin = 4 * (got.double() - oracle).abs().max().item() + 0.1 * floor * oracle.abs().max().item()
        assert (oracle.gather(1, pred[:, None])[:, 0] >= oracle.max(-1).values - margin).all()

    def run(p, use_reference):
        p = with_grad(p)
        with differentiable_rounding(round_grad=p[0].dtype == torch.float32):
            value = (
                reference.loss(idx, targets, p, cfg, precision, reduction)
                if use_reference
                else cpp_backend.loss(idx, targets, p, cfg, precision, reduction)
            )
        if reduction == "none":  # a different weight per row: the backward's general path
            value = (value * torch.linspace(-1.0, 2.0, n, dtype=value.dtype)).sum()
        value.backward()
        return value.detach(), grads_of(p)

    loss, grads = run(params, False)
    if n == 0:  # as the triton backend: the mean (and sum) of no rows is 0, with zero gradients
        assert loss.item() == 0.0 and all((g == 0).all() for g in grads)
        return
    loss32, grads32 = run(params, True)
    loss64, grads64 = run(oracle_params, True)
    assert loss.dtype == torch.float32
    scale_of_sum = n if reduction == "sum" else 2 * n if reduction == "none" else 1
    # LOSS_ATOL per row: one ulp of each row's float32 softmax sum (see test_triton_kernels)
    loss_atol = LOSS_ATOL * (1 if reduction == "mean" else 2 * n)
    assert_2x_rule("loss", loss, loss32, loss64, atol_rel=floor, atol=loss_atol)
    factor = 2.0 if precision == "fp32" else 4.0
    scales = row_term_scales(idx, targets, oracle_params, cfg)
    for name, g, g32, g64, scale in zip(AUNNParams._fields, grads, grads32, grads64, scales):
        assert_2x_rule(
            f"d {name}", g, g32, g64, atol_rel=max(floor, GRAD_FLOOR_FP32), factor=factor, scale=scale * scale_of_sum
        )


# ----------------------------------------------------------------------------- accuracy

FIXED_CASES = [
    # hidden, layers, residual_every, bits, vocab, batch
    (64, 8, 2, 64, 4, 300),  # the seed model (its head as dot products), 48-row blocks over the threads
    (16, 2, 1, 64, 5, 37),  # no hidden layer
    (17, 3, 1, 20, 2, 1),  # hidden not a multiple of the vector width, binary vocab, one row
    (48, 5, 3, 64, 300, 97),  # residual_every 3, vocab padded, a short last block
    (32, 12, 2, 1, 3, 50),  # a single bit, the deepest model
    (16, 4, 5, 7, 7, 0),  # residual_every beyond the hidden layers; an empty batch
    (16, 3, 1, 64, 3, 4097),  # the largest batch: 86 blocks and a 17-row one over the threads
    (24, 4, 2, 37, 6, 1500),  # the input layer by 4-bit groups (>= 256 rows a thread), the last group of one bit
]
BF16_CASES = [  # odd rows in a block (its bf16 row pairs end in a zero row), odd hidden and vocab (pairs along k)
    (64, 8, 2, 64, 4, 300),
    (17, 3, 1, 20, 3, 1),
    (48, 5, 3, 64, 301, 97),
    (33, 12, 2, 1, 3, 50),
]


@needs_extension
@pytest.mark.parametrize("hidden,layers,residual_every,bits,vocab,batch", FIXED_CASES)
def test_against_reference(hidden, layers, residual_every, bits, vocab, batch, generator):
    cfg = AUNNConfig(vocab_size=vocab, hidden=hidden, layers=layers, bits=bits, residual_every=residual_every)
    check_against_reference(cfg, batch, generator)


@needs_extension
@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_threads_against_reference(threads, generator):
    """Every output and gradient with the rows in blocks on one, two and three threads, whose gradient sums
    are then added up and unpacked in shares of the parameters' rows."""
    cfg = AUNNConfig(vocab_size=7, hidden=40, layers=6, bits=64)
    check_against_reference(cfg, 211, generator)


@needs_extension
def test_forward_does_not_depend_on_the_thread_count(generator):
    """The logits are the same bits on one, two and three threads where every thread has at least 256 rows (then
    every thread sums the input layer by groups, and the blocks are 48 rows whichever thread claims them): at 800
    rows three threads get 266 each; a thread's own share of the blocks deciding would give the third 224 rows
    and the bit-by-bit sums."""
    from aunn_fast import cpp_backend

    cfg = AUNNConfig(vocab_size=5, hidden=40, layers=6, bits=64)
    params = make_params(cfg, generator)
    idx = make_indices(cfg, 800, generator)
    old = torch.get_num_threads()
    logits = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            logits.append(cpp_backend.logits(idx, params, cfg, "fp32"))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


@needs_bf16
@pytest.mark.parametrize("hidden,layers,residual_every,bits,vocab,batch", BF16_CASES)
def test_bf16_against_reference(hidden, layers, residual_every, bits, vocab, batch, generator):
    cfg = AUNNConfig(vocab_size=vocab, hidden=hidden, layers=layers, bits=bits, residual_every=residual_every)
    check_against_reference(cfg, batch, generator, precision="bf16")


@needs_extension
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_against_reference(reduction, precision, generator):
    cfg = AUNNConfig(vocab_size=11, hidden=32, layers=6, bits=64)
    check_against_reference(cfg, 130, generator, reduction, precision)


@needs_extension
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("draw", range(3))
def test_random_shapes(draw, precision, generator):
    """Shapes drawn at random: H 16-512, layers 2-12, vocab 2-300, bits 1-64, batch 0-4,097, the batch kept to
    what the float64 oracle's per-row gradients (row_term_scales) can afford on two cores."""

    def pick(low, high):
        return int(torch.randint(low, high + 1, (), generator=generator))

    hidden = int(2 ** (4 + 5 * torch.rand((), generator=generator).item()))  # 16..512, log-uniform
    layers, vocab, bits, every = pick(2, 12), pick(2, 300), pick(1, 64), pick(1, 4)
    budget = 1e7 // (hidden * (hidden * max(layers - 2, 1) + bits + vocab))
    batch = min(pick(0, 4097), int(budget))
    cfg = AUNNConfig(vocab_size=vocab, hidden=hidden, layers=layers, bits=bits, residual_every=every)
    print(cfg, batch)
    check_against_reference(cfg, batch, generator, precision=precision)


@needs_extension
@pytest.mark.parametrize("precision", PRECISIONS)
def test_logits_gradient_against_reference(precision, generator):
    """The backward of the logits themselves (an arbitrary upstream gradient [N, V])."""
    cfg = AUNNConfig(vocab_size=9, hidden=24, layers=5, bits=64, residual_every=2)
    params, n = make_params(cfg, generator), 70
    idx = make_indices(cfg, n, generator)
    upstream = torch.randn(n, cfg.vocab_size, generator=generator)
    from aunn_fast import cpp_backend

    def run(p, fn):
        p = with_grad(p)
        with differentiable_rounding(round_grad=p[0].dtype == torch.float32):
            (fn(p) * upstream.to(p[0].dtype)).sum().backward()
        return grads_of(p)

    got = run(params, lambda p: cpp_backend.logits(idx, p, cfg, precision))
    ref32 = run(params, lambda p: reference.logits(idx, p, cfg, precision))
    oracle = run(as_double(params), lambda p: reference.logits(idx, p, cfg, precision))
    floor, factor = max(PRECISION_FLOOR[precision], GRAD_FLOOR_FP32), 2.0 if precision == "fp32" else 4.0
    for name, g, g32, g64 in zip(AUNNParams._fields, got, ref32, oracle):
        assert_2x_rule(f"d {name}", g, g32, g64, atol_rel=floor, factor=factor)


# ----------------------------------------------------------------------------- the one-call step


@needs_extension
@pytest.mark.parametrize(
    "optimizer,precision", [("adam", "fp32"), ("sgd", "fp32"), pytest.param("sgd", "bf16", marks=needs_bf16)]
)
@pytest.mark.parametrize("batch,threads", [(6, 2), (40, 2)], indirect=["threads"])
def test_one_call_step_matches_torch_optim(optimizer, precision, batch, threads, generator):
    """Two steps of OneCallStep against autograd + torch.optim on the reference, in float32 and float64, by the
    2x rule on each parameter's total change (bf16: its factor and floor); its returned loss is the first
    step's. A prompt of 6 indices runs in one block, 40 in two: the update is shared between the threads."""
    from aunn_fast import cpp_backend
    from aunn_fast.inference import conditioning_optimizer

    cfg = AUNNConfig(vocab_size=5, hidden=32, layers=4, bits=64)
    start = random_model(cfg, generator, backend="reference").state_dict()
    idx = make_indices(cfg, batch, generator)
    targets = torch.randint(0, 5, (batch,), generator=generator)
    lr = 1e-2 if optimizer == "sgd" else 1e-3

    def torch_steps(dtype):
        model = AUNN(cfg, backend="reference", precision=precision).to(dtype)
        model.load_state_dict(start)
        opt = conditioning_optimizer(model, optimizer, lr)
        with differentiable_rounding(round_grad=dtype == torch.float32):
            for _ in range(2):
                opt.zero_grad()
                model.loss(idx, targets).backward()
                opt.step()
        return model

    fast = AUNN(cfg, backend="cpp", precision=precision)
    fast.load_state_dict(start)
    step = cpp_backend.OneCallStep(fast, optimizer, lr)
    first = step(idx, targets)
    step(idx, targets)
    start_params = AUNNParams(*(start[name] for name in AUNNParams._fields))
    assert_2x_rule(
        "first loss",
        first,
        reference.loss(idx, targets, start_params, cfg, precision),
        reference.loss(idx, targets, as_double(start_params), cfg, precision),
        atol_rel=PRECISION_FLOOR[precision],
        atol=LOSS_ATOL,
    )
    ref32, ref64 = torch_steps(torch.float32), torch_steps(torch.float64)
    # Adam's first steps move each weight by about lr * sign(gradient): a gradient within float32 noise of zero
    # may go either way in any float32 computation, so Adam's floor is a tenth of the two steps' size
    floor = 0.1 * 2 * lr if optimizer == "adam" else 0.0
    atol_rel, factor = (ATOL_REL, 2.0) if precision == "fp32" else (PRECISION_FLOOR[precision], 4.0)
    for (name, p), q32, q64 in zip(fast.named_parameters(), ref32.parameters(), ref64.parameters()):
        p0 = start[name]
        change, change64 = p.detach() - p0, q64.detach() - p0.double()
        assert_2x_rule(name, change, q32.detach() - p0, change64, atol_rel=atol_rel, factor=factor, atol=floor)


@needs_extension
@pytest.mark.parametrize("max_norm", [None, 0.05])  # 0.05 clips these gradients (norms ~0.3-1), None never
@pytest.mark.parametrize("threads", [2], indirect=True)  # 40 rows in two blocks: sum and update shared
def test_fused_adamw_step_matches_clipped_torch_adamw(max_norm, threads, generator):
    """Three steps of FusedAdamWStep (weight decay, a learning rate changed between steps as a schedule does)
    against autograd + clip_grad_norm_ + torch.optim.AdamW on the reference, in float32 and float64, by the 2x
    rule on each parameter's total change and on the moments; the optimizer's state is torch's own."""
    from aunn_fast import cpp_backend

    cfg = AUNNConfig(vocab_size=5, hidden=32, layers=5, bits=64)
    start = random_model(cfg, generator, backend="reference").state_dict()
    batches = [(make_indices(cfg, 40, generator), torch.randint(0, 5, (40,), generator=generator)) for _ in range(3)]
    rates = (3e-3, 2e-3, 1e-3)

    def torch_steps(dtype):
        model = AUNN(cfg, backend="reference").to(dtype)
        model.load_state_dict(start)
        opt = torch.optim.AdamW(model.parameters(), lr=rates[0], weight_decay=5.0)
        for lr, (idx, targets) in zip(rates, batches):
            opt.param_groups[0]["lr"] = lr
            opt.zero_grad()
            model.loss(idx, targets).backward()
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
        return model, opt

    fast = AUNN(cfg, backend="cpp")
    fast.load_state_dict(start)
    opt = torch.optim.AdamW(fast.parameters(), lr=rates[0], weight_decay=5.0)
    step = cpp_backend.fused_adamw_step(fast, opt, max_norm)
    assert isinstance(step, cpp_backend.FusedAdamWStep)
    losses = []
    for lr, (idx, targets) in zip(rates, batches):
        opt.param_groups[0]["lr"] = lr
        losses.append(step(idx, targets))
    (ref32, opt32), (ref64, opt64) = torch_steps(torch.float32), torch_steps(torch.float64)
    start_params = AUNNParams(*(start[name] for name in AUNNParams._fields))
    idx, targets = batches[0]
    assert_2x_rule(
        "first loss",
        losses[0],
        reference.loss(idx, targets, start_params, cfg),
        reference.loss(idx, targets, as_double(start_params), cfg),
        atol=LOSS_ATOL,
    )
    floor = 0.1 * sum(rates)  # Adam moves a weight by ~lr per step, either way for a gradient within noise of 0
    for (name, p), q32, q64 in zip(fast.named_parameters(), ref32.parameters(), ref64.parameters()):
        p0 = start[name]
        assert_2x_rule(name, p.detach() - p0, q32.detach() - p0, q64.detach() - p0.double(), atol=floor)
        state, state32, state64 = opt.state[p], opt32.state[q32], opt64.state[q64]
        assert float(state["step"]) == float(state32["step"]) == 3.0
        for moment in ("exp_avg", "exp_avg_sq"):
            assert_2x_rule(f"{name} {moment}", state[moment], state32[moment], state64[moment], atol_rel=1e-4)
        assert_2x_rule(f"{name} grad", p.grad, q32.grad, q64.grad, atol_rel=GRAD_FLOOR_FP32)


@needs_extension
def test_fused_adamw_step_applies_only_where_it_computes_the_same(generator):
    """fused_adamw_step gives None (the trainer then runs the eager step) for anything but a plain AdamW over
    exactly the model's parameters on the cpp backend in fp32."""
    from aunn_fast.cpp_backend import fused_adamw_step

    cfg = AUNNConfig(vocab_size=4, hidden=16, layers=3)
    model = AUNN(cfg, backend="cpp")
    params = list(model.parameters())
    assert fused_adamw_step(model, torch.optim.AdamW(params), 1.0) is not None
    assert fused_adamw_step(model, torch.optim.AdamW(params), None) is not None
    assert fused_adamw_step(model, torch.optim.SGD(params, lr=1e-2), 1.0) is None
    assert fused_adamw_step(model, torch.optim.Adam(params), 1.0) is None  # L2 weight decay, not decoupled
    assert fused_adamw_step(model, torch.optim.AdamW(params, amsgrad=True), 1.0) is None
    assert fused_adamw_step(model, torch.optim.AdamW(params, maximize=True), 1.0) is None
    assert fused_adamw_step(model, torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}]), 1.0) is None
    assert fused_adamw_step(model, torch.optim.AdamW(params[1:]), 1.0) is None
    assert fused_adamw_step(AUNN(cfg, backend="reference"), torch.optim.AdamW(params), 1.0) is None
    hooked = torch.optim.AdamW(params)
    hooked.register_step_post_hook(lambda *a: None)
    assert fused_adamw_step(model, hooked, 1.0) is None


@needs_extension
@pytest.mark.filterwarnings("error::UserWarning")  # e.g. torch's "lr_scheduler.step() before optimizer.step()"
def test_training_on_cpp_runs_the_fused_step_and_matches_the_eager_one(generator, monkeypatch, tmp_path):
    """aunn_fast.train on the cpp backend steps through FusedAdamWStep; with it turned off (the eager autograd +
    clip + AdamW step) the same run logs the same losses and ends with the same weights, up to float32 rounding."""
    from aunn_fast import cpp_backend, train
    from aunn_fast.data import ToyData

    data = ToyData(chunks=64, seed=0)
    cfg = AUNNConfig(vocab_size=data.vocab_size, hidden=16, layers=4)
    settings = train.TrainConfig(batch_size=32, steps=12, lr=1e-2, warmup_steps=2, log_every=1, save_every=1000)
    calls = []
    original = cpp_backend.FusedAdamWStep.__call__
    monkeypatch.setattr(cpp_backend.FusedAdamWStep, "__call__", lambda s, *a: calls.append(1) or original(s, *a))
    runs = {}
    for kind in ("fused", "eager"):
        if kind == "eager":
            monkeypatch.setattr(train, "fused_adamw_step", lambda *a: None)
        model = AUNN(cfg, backend="cpp", seed=0)
        rows = train.train(model, data, settings, run_dir=tmp_path / kind, progress=False)
        runs[kind] = (model, torch.tensor([row["loss"] for row in rows]))
        assert len(calls) == 12
    torch.testing.assert_close(runs["fused"][1], runs["eager"][1], rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(runs["fused"][0].named_parameters(), runs["eager"][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


@needs_extension
def test_condition_uses_one_call_steps(generator, monkeypatch):
    """inference.condition on the CPU runs OneCallStep for the cpp backend, and lands where the reference does."""
    from aunn_fast import cpp_backend, inference

    calls = []
    original = cpp_backend.OneCallStep.__call__
    monkeypatch.setattr(cpp_backend.OneCallStep, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    cfg = AUNNConfig(vocab_size=4, hidden=16, layers=4, bits=64)
    model = random_model(cfg, generator, backend="cpp")
    ref = random_model(cfg, generator, backend="reference")
    ref.load_state_dict(model.state_dict())
    prompt = torch.tensor([1, 3, 0])
    tuned = inference.condition(model, prompt, at=1000, steps=3)
    tuned_ref = inference.condition(ref, prompt, at=1000, steps=3)
    assert len(calls) == 3
    for (name, a), b in zip(tuned.named_parameters(), tuned_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@needs_extension
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_one_call_step_reads_parameters_changed_between_steps(optimizer, generator):
    """The operator keeps its buffers (workspaces, the packed weights' storage) across steps: a step after the
    parameters were changed outside it (in place, through .data, which no version counter sees, and by a
    load_state_dict) computes with the new values, and so does a step of another model of another width (a
    padded one after a wider unpadded one: its padding must be zeros again) in between."""
    from aunn_fast import cpp_backend

    cfg = AUNNConfig(vocab_size=5, hidden=32, layers=4, bits=64)
    model = random_model(cfg, generator, backend="cpp")
    step = cpp_backend.OneCallStep(model, optimizer, 1e-3)
    narrow_cfg = AUNNConfig(vocab_size=3, hidden=20, layers=3, bits=64)  # H=20: padded at every vector width
    narrow = random_model(narrow_cfg, generator, backend="cpp")
    narrow_step = cpp_backend.OneCallStep(narrow, optimizer, 1e-3)
    idx = make_indices(cfg, 6, generator)
    targets = torch.randint(0, 3, (6,), generator=generator)

    def expect_loss_at_current_values(run, m):
        params = AUNNParams(*(p.detach().clone() for p in (getattr(m, name) for name in AUNNParams._fields)))
        loss = run(idx, targets)
        assert_2x_rule(
            "loss",
            loss,
            reference.loss(idx, targets, params, m.cfg),
            reference.loss(idx, targets, as_double(params), m.cfg),
            atol=LOSS_ATOL,
        )

    expect_loss_at_current_values(step, model)
    model.hidden_weight.data.mul_(-1.5)  # .data: no version bump
    model.out_bias.data.add_(0.5)
    expect_loss_at_current_values(step, model)
    expect_loss_at_current_values(narrow_step, narrow)
    model.load_state_dict(random_model(cfg, generator).state_dict())
    expect_loss_at_current_values(step, model)
    expect_loss_at_current_values(narrow_step, narrow)


@needs_extension
def test_train_step_takes_flat_or_per_parameter_buffers(generator):
    """cpp_train_step's grads and moments as one buffer each (OneCallStep's) give exactly what eight
    parameter-shaped tensors each give; a flat buffer of the wrong size is refused."""
    cfg = AUNNConfig(vocab_size=4, hidden=16, layers=4, bits=64)
    start = make_params(cfg, generator)
    idx = make_indices(cfg, 10, generator)
    targets = torch.randint(0, 4, (10,), generator=generator)
    settings = (2, 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.5, cfg.residual_every, cfg.norm_eps, False)  # step 2, clipping

    def run(flat):
        params = [p.clone() for p in start]
        state = [torch.randn(3, p.numel(), generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
        buffers = [[s[k].abs().view_as(p).clone() for s, p in zip(state, params)] for k in range(3)]  # exp_avg_sq >= 0
        if flat:
            buffers = [[torch.cat([b.reshape(-1) for b in group])] for group in buffers]
        loss = ops.cpp_train_step(idx, targets, params, *buffers, *settings)
        return loss, params, [torch.cat([b.reshape(-1) for b in group]) for group in buffers]

    (loss8, params8, buffers8), (loss1, params1, buffers1) = run(False), run(True)
    assert torch.equal(loss8, loss1)
    for a, b in zip(params8 + buffers8, params1 + buffers1):
        assert torch.equal(a, b)
    params = [p.clone() for p in start]
    with pytest.raises(RuntimeError, match="must hold"):
        ops.cpp_train_step(idx, targets, params, [torch.zeros(5)], [], [], *settings[:5], 0.0, *settings[6:])


@needs_extension
def test_train_step_leaves_subnormals_on(generator):
    """The update flushes subnormals (DAZ/FTZ) only while it runs: float arithmetic after a step still produces
    them."""
    from aunn_fast import cpp_backend

    model = random_model(AUNNConfig(vocab_size=4, hidden=16, layers=3), generator, backend="cpp")
    cpp_backend.OneCallStep(model, "adam", 1e-3)(make_indices(model.cfg, 3, generator), torch.tensor([0, 1, 2]))
    tiny = torch.tensor([1e-30], dtype=torch.float32) * torch.tensor([1e-10], dtype=torch.float32)
    assert 0 < tiny.item() < 1.2e-38


# ----------------------------------------------------------------------------- registration, compile, dispatch


@needs_extension
@pytest.mark.parametrize("precision", PRECISIONS)
def test_opcheck(precision, generator):
    cfg = AUNNConfig(vocab_size=6, hidden=16, layers=4, bits=64)
    params = [p.requires_grad_() for p in make_params(cfg, generator)]
    idx = make_indices(cfg, 9, generator)
    targets = torch.randint(0, 6, (9,), generator=generator)
    settings = (cfg.residual_every, cfg.norm_eps, precision == "bf16")
    torch.library.opcheck(ops.cpp_logits, (idx, *params, *settings))
    torch.library.opcheck(ops.cpp_loss, (idx, targets, *params, *settings, True))
    torch.library.opcheck(ops.cpp_loss, (idx, targets, *params, *settings, False))
    frozen = [p.detach() for p in params]
    torch.library.opcheck(ops.cpp_argmax, (idx, *frozen, *settings))
    torch.library.opcheck(ops.cpp_logits_backward, (torch.randn(9, 6, generator=generator), idx, *frozen, *settings))
    unit = list(ops.cpp_loss(idx, targets, *frozen, *settings, True)[1])
    torch.library.opcheck(ops.cpp_loss_backward, (torch.full((9,), 0.5), unit, idx, targets, *frozen, *settings))
    moments = [[torch.zeros_like(p) for p in frozen] for _ in range(3)]  # grads, exp_avg, exp_avg_sq
    torch.library.opcheck(
        ops.cpp_train_step,
        (idx, targets, [p.clone() for p in frozen], *moments, 1, 1e-3, 0.9, 0.999, 1e-8, 0.1, 1.0, *settings),
    )


@needs_extension
@pytest.mark.parametrize(
    "out_bias",
    [
        [1.0, 3.0, 3.0, 2.0],  # ties: the first maximum
        [0.0, float("nan"), 5.0, float("nan")],  # the first NaN beats every number
        [float("nan"), 1.0, float("nan"), 2.0],  # a NaN first stays
        [float("-inf"), float("-inf"), -1.0, float("-inf")],
        [7.0, float("inf"), float("inf"), 0.0],
    ],
)
def test_argmax_is_torchs_first_maximum_with_nan_largest(out_bias, generator):
    from aunn_fast import cpp_backend

    cfg = AUNNConfig(vocab_size=4, hidden=16, layers=4, bits=64)
    params = make_params(cfg, generator)._replace(
        out_weight=torch.zeros(4, 16), out_bias=torch.tensor(out_bias)
    )  # every row's logits are the bias exactly
    idx = make_indices(cfg, 7, generator)
    expected = torch.tensor(out_bias).argmax().expand(7)
    assert torch.equal(cpp_backend.predict(idx, params, cfg, "fp32"), expected)


@needs_extension
def test_compile_fullgraph(generator):
    cfg = AUNNConfig(vocab_size=5, hidden=16, layers=4, bits=64)
    model = random_model(cfg, generator, backend="cpp")
    idx = make_indices(cfg, 12, generator).reshape(3, 4)
    targets = torch.randint(0, 5, (3, 4), generator=generator)
    check_compiled_model(model, idx, targets, tolerance=1e-6)


@needs_extension
def test_auto_picks_cpp_on_the_cpu_where_it_runs_the_precision(monkeypatch):
    from aunn_fast import cpp_backend

    assert resolve_backend("auto", "cpu").name == "cpp"
    assert resolve_backend("auto", "cpu", "fp32").name == "cpp"
    assert resolve_backend("auto", "cpu", "tf32").name == "reference"  # not offered by cpp
    assert AUNN(AUNNConfig(hidden=8, layers=2)).active_backend().name == "cpp"
    assert resolve_backend("auto", "cpu", "bf16").name == ("cpp" if _BF16_REASON is None else "reference")
    monkeypatch.setitem(cpp_backend._registered, "bf16", False)  # as on a CPU without AVX512-BF16
    assert resolve_backend("auto", "cpu", "bf16").name == "reference"


@needs_extension
def test_bf16_without_the_instructions_is_a_clear_error(monkeypatch):
    """On a CPU (or -march build) without AVX512-BF16, bf16 is refused before any work, naming why; in C++ too."""
    from aunn_fast import cpp_backend

    monkeypatch.setitem(cpp_backend._registered, "bf16", False)
    model = AUNN(AUNNConfig(hidden=8, layers=2), backend="cpp", precision="bf16")
    with pytest.raises(ValueError, match="cannot run precision 'bf16' here: its bf16 needs a CPU with AVX512-BF16"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="does not offer precision 'tf32'"):
        AUNN(AUNNConfig(hidden=8, layers=2), backend="cpp", precision="tf32")(torch.tensor([1, 2]))
    if not ops.cpp_has_bf16():
        cfg = AUNNConfig(hidden=8, layers=2)
        params = init_params(cfg, torch.Generator().manual_seed(0))
        with pytest.raises(RuntimeError, match="bf16 needs AVX512-BF16 instructions"):
            ops.cpp_logits(torch.tensor([1]), *params, cfg.residual_every, cfg.norm_eps, True)


@needs_extension
def test_bad_input_is_refused_before_the_backend(monkeypatch):
    """The module's checks run before dispatch, so the cpp backend gives the other backends' errors."""
    from aunn_fast import cpp_backend

    monkeypatch.setattr(cpp_backend, "logits", lambda *a: pytest.fail("the backend ran"))
    model = AUNN(AUNNConfig(vocab_size=4, hidden=8, layers=3, bits=8), backend="cpp")
    with pytest.raises(ValueError, match="past the model's largest index|out of range|largest"):
        model(torch.tensor([300]))
    with pytest.raises(TypeError, match="indices must be int64"):
        model(torch.tensor([1.0]))


# ----------------------------------------------------------------------------- without the extension


def _availability_in_subprocess(env_changes: dict[str, str], tmp_path) -> str:
    """What the cpp backend says in a fresh interpreter with env_changes applied (and an empty build cache)."""
    env = {**os.environ, "AUNN_FAST_CPP_CACHE": str(tmp_path), **env_changes}
    code = (
        "import torch; from aunn_fast.backends import BACKENDS, resolve_backend; "
        "print(BACKENDS['cpp'].unavailable_reason(torch.device('cpu'))); "
        "print(resolve_backend('auto', 'cpu').name)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_turned_off_by_environment(tmp_path):
    out = _availability_in_subprocess({"AUNN_FAST_CPP": "0"}, tmp_path)
    assert out.splitlines() == ["turned off by AUNN_FAST_CPP=0", "reference"]


def test_without_a_compiler_the_package_still_runs(tmp_path):
    out = _availability_in_subprocess({"CXX": "/nonexistent/c++"}, tmp_path)
    assert out.splitlines()[0].startswith("no C++ compiler found") and out.splitlines()[1] == "reference"


def test_build_key_follows_the_sources_and_their_place(tmp_path):
    """A changed source file gives a new build folder, and so does another checkout of the same sources (its
    ninja file would name other paths, and two checkouts sharing a folder rebuilt each other's objects)."""
    from aunn_fast import cpp_build

    first, second = tmp_path / "a" / "csrc", tmp_path / "b" / "csrc"
    for copy in (first, second):
        shutil.copytree(cpp_build.source_dir(), copy)
    assert cpp_build.build_key(first) == cpp_build.build_key(first)
    assert cpp_build.build_key(first) != cpp_build.build_key(second)
    before = cpp_build.build_key(first)
    (first / "cpu" / "ops.cpp").write_text((first / "cpu" / "ops.cpp").read_text() + "\n")
    assert cpp_build.build_key(first) != before


@needs_extension
def test_a_killed_builds_lock_file_does_not_block_later_builds(tmp_path):
    """torch's build baton leaves a ``lock`` file behind a killed build, on which every later build would wait
    forever; the flock aunn_fast holds while building shows it is a leftover and removes it."""
    from aunn_fast import cpp_build

    name = f"{cpp_build.EXTENSION_NAME}-{cpp_build.build_key(cpp_build.source_dir())}"
    shutil.copytree(cpp_build.cache_root() / name, tmp_path / name)  # the built extension: no recompilation
    (tmp_path / name / "lock").write_text("")
    out = _availability_in_subprocess({}, tmp_path)
    assert out.splitlines() == ["None", "cpp"] and not (tmp_path / name / "lock").exists()


def test_a_bad_switch_value_is_refused(monkeypatch):
    monkeypatch.setenv("AUNN_FAST_CPP", "yes")
    with pytest.raises(ValueError, match="AUNN_FAST_CPP must be 0 or 1, got 'yes'"):
        BACKENDS["cpp"].check_settings()


# ----------------------------------------------------------------------------- the bench suite's CPU ceiling


def test_cpu_ceiling_shares():
    """A row's share is its FLOP/s (forward FLOPs per index, x3 for training) over its precision's rate."""
    from aunn_fast.bench import cpu_ceiling
    from aunn_fast.bench.ceilings import forward_flops

    seed = AUNNConfig()
    measured = {"flops": {"fp32": 1e11}, "source": "test"}
    rows = [
        {"workload": "predict", "config": "seed", "precision": "fp32", "items_per_s": 1e6},
        {"workload": "train", "config": "seed", "precision": "fp32", "items_per_s": 1e6},
        {"workload": "condition", "config": "seed", "precision": "fp32", "items_per_s": 1e6},
        {"workload": "train", "config": "seed", "precision": "bf16", "items_per_s": 1e6},
    ]
    cpu_ceiling.add_shares(rows, {"seed": seed}, measured)
    assert rows[0]["matmul_share"] == pytest.approx(1e6 * forward_flops(seed) / 1e11)
    assert rows[1]["matmul_share"] == pytest.approx(3 * rows[0]["matmul_share"])
    assert rows[2]["matmul_share"] is None and rows[3]["matmul_share"] is None
    assert "fp32 100.0 GFLOP/s" in cpu_ceiling.summary(measured)
    assert cpu_ceiling.matmul_flops(torch.float32, size=64, repeats=1) > 0


@pytest.mark.parametrize("bf16_instructions", [False, True])
def test_cpu_ceiling_measures_bf16_only_where_the_cpu_has_bf16_instructions(monkeypatch, bf16_instructions):
    """Emulated, a bf16 product is no ceiling (and took ~25 s a bench run on an AVX2 CPU): it is left out."""
    from aunn_fast.bench import cpu_ceiling

    timed = []
    monkeypatch.setattr(cpu_ceiling, "matmul_flops", lambda dtype: timed.append(dtype) or 1e11)
    monkeypatch.setattr(cpu_ceiling, "has_bf16_instructions", lambda: bf16_instructions)
    measured = cpu_ceiling.measure()
    assert timed == ([torch.float32, torch.bfloat16] if bf16_instructions else [torch.float32])
    assert set(measured["flops"]) == ({"fp32", "bf16"} if bf16_instructions else {"fp32"})
    assert ("bf16 not measured" in measured["source"]) != bf16_instructions


# ----------------------------------------------------------------------------- the CUDA plumbing


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_compile_check_cuda_reports_the_kernels(tmp_path):
    """compile_check --cuda compiles csrc/cuda for sm_90a without a GPU and reports each kernel's resources."""
    from aunn_fast.bench import compile_check, cuda_compile_check

    table = tmp_path / "cuda.md"
    assert compile_check.main(["--cuda", "--out", str(table)]) == 0
    rows = [
        dict(zip(cuda_compile_check.COLUMNS, (c.strip() for c in line.split("|")[1:-1])))
        for line in table.read_text().splitlines()[2:]
    ]
    (scale,) = [r for r in rows if "scale_kernel" in r["kernel"]]
    assert int(scale["registers"]) > 0 and scale["verdict"] == "ok"
    assert cuda_compile_check.parse_ptxas(
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 16384 bytes smem"
    ) == [{"kernel": "k", "registers": 255, "spill stores": 4, "spill loads": 4, "stack": 8, "shared": 16384}]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_extension_runs_its_kernel():
    from aunn_fast import cpp_build

    reason = cpp_build.cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(f"CUDA extension unavailable: {reason}")
    x = torch.randn(1000, device="cuda")
    torch.testing.assert_close(ops.cuda_scale(x, 2.5), 2.5 * x)
