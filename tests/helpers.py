"""Shared test helpers: models with non-trivial parameters, relative errors."""
from __future__ import annotations

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
    idx = torch.randint(0, 2**62, (n,), generator=generator, dtype=torch.int64) * 2
    idx = idx % (top + 1) if bits < 63 else idx + torch.randint(0, 2, (n,), generator=generator)
    if n:
        idx[0] = top
    return idx


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64."""
    expected = expected.detach().double()
    return float((actual.detach().double() - expected).norm() / expected.norm().clamp_min(1e-30))
