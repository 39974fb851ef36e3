"""Every usable backend behind the AUNN module gives the reference's answers, in every precision."""

import pytest
import torch

from aunn_fast import AUNNConfig
from aunn_fast.backends import BACKENDS, available_backends

from helpers import random_indices, random_model, rel_err

USABLE = [name for name, reason in available_backends("cpu").items() if reason is None and name != "reference"]
# Against the reference in the same precision. The logits are the same math (a rounding boundary may fall
# differently after a reordered sum); gradients in tf32/bf16 differ by up to about the precision's own
# effect, as the kernels round both operands of every backward product and autograd only the result.
TOLERANCE = {"fp32": 1e-5, "tf32": 1e-3, "bf16": 1e-2}


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("backend", USABLE)
def test_backend_matches_reference_through_the_module(generator, backend, precision):
    if precision not in BACKENDS[backend].precisions:
        pytest.skip(f"backend {backend} does not offer {precision}")
    reason = BACKENDS[backend].precision_unavailable(precision)
    if reason is not None:  # e.g. cpp's bf16 on a CPU without AVX512-BF16 (its refusal: tests/test_cpp.py)
        pytest.skip(f"backend {backend} cannot run {precision} on this machine: {reason}")
    cfg = AUNNConfig(vocab_size=7, hidden=32, layers=5, bits=64)
    ref = random_model(cfg, generator, backend="reference", precision=precision)
    fast = random_model(cfg, generator, backend=backend, precision=precision)
    fast.load_state_dict(ref.state_dict())
    full = random_model(cfg, generator, backend="reference", precision="fp32")
    full.load_state_dict(ref.state_dict())
    idx = random_indices(30, 64, generator).reshape(5, 6)
    targets = torch.randint(0, 7, (5, 6), generator=generator)
    tol = TOLERANCE[precision]

    logits, expected = fast(idx), ref(idx)
    assert rel_err(logits, expected) < tol
    if precision != "fp32":  # the precision is honoured: far closer to its reference than to fp32's
        assert rel_err(logits, expected) < 0.5 * rel_err(expected, full(idx))

    predicted = fast.predict(idx)
    assert predicted.shape == (5, 6)
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 4 * (logits - expected).abs().amax()
    assert clear.float().mean() > 0.5
    assert torch.equal(predicted[clear], expected.argmax(-1)[clear])

    ref.loss(idx, targets).backward()
    fast_loss = fast.loss(idx, targets)
    fast_loss.backward()
    assert rel_err(fast_loss, ref.loss(idx, targets)) < tol
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        assert rel_err(a.grad, b.grad) < tol, name
