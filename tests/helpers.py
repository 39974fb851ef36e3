"""Shared test helpers: models with non-trivial parameters, relative errors, the compiled-model check."""

from __future__ import annotations

import pytest
import torch

from aunn_fast import AUNN, AUNNConfig


def random_model(cfg: AUNNConfig, generator: torch.Generator, **kwargs: object) -> AUNN:
    """An AUNN whose biases and gains are random (not the zero/one init), so every parameter matters."""
    model = AUNN(cfg, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=generator) * (2.0 / max(p.shape[-1], 1)) ** 0.5)
            elif name.endswith("gain"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    return model


def random_indices(n: int, bits: int, generator: torch.Generator) -> torch.Tensor:
    """int64 [n] indices spread over [0, 2**bits), with the largest valid index included."""
    top = min(2**bits, 2**63) - 1
    if bits < 63:
        idx = torch.randint(0, top + 1, (n,), generator=generator, dtype=torch.int64)
    else:  # randint's bound is an int64: draw 62 bits, shift, and add the lowest bit
        idx = torch.randint(0, 2**62, (n,), generator=generator, dtype=torch.int64) * 2
        idx = idx + torch.randint(0, 2, (n,), generator=generator)
    if n:
        idx[0] = top
    return idx


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64."""
    expected = expected.detach().double()
    return float((actual.detach().double() - expected).norm() / expected.norm().clamp_min(1e-30))


def check_compiled_model(model: AUNN, idx: torch.Tensor, targets: torch.Tensor, tolerance: float) -> None:
    """torch.compile(fullgraph=True) of the model's forward, loss + backward and predict (range checks on,
    as by default) match the same model run eagerly, within ``tolerance`` (relative, normwise: a reordered
    sum may move one reduced-precision operand across a rounding boundary); in tf32/bf16 the compiled
    logits are also far closer to the eager ones than fp32's are, so the precision is honoured. Dtype errors
    still surface while tracing."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    logits, expected = compiled(idx), model(idx)
    assert rel_err(logits, expected) < tolerance
    if model.active_precision() != "fp32":
        full = AUNN(model.cfg, backend="reference", precision="fp32").to(model.device)
        full.load_state_dict(model.state_dict())
        assert rel_err(logits, expected) < 0.5 * rel_err(expected, full(idx))

    def loss_and_grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(idx, targets)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    eager = loss_and_grads(model.loss)
    for c, e in zip(loss_and_grads(torch.compile(model.loss, fullgraph=True)), eager):
        assert rel_err(c, e) < tolerance
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 4 * (logits - expected).abs().amax()
    assert torch.equal(torch.compile(model.predict, fullgraph=True)(idx)[clear], model.predict(idx)[clear])
    with pytest.raises(TypeError, match="indices must be int64"):  # fullgraph would wrap it in its own error
        torch.compile(model)(idx.float())
