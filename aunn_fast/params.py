"""The parameter tensors of an AUNN, in the layout every backend reads.

Hidden layers are stacked so that a kernel can walk them with one pointer.
Shapes (H = hidden, L = layers, V = vocab_size, B = bits), all float32:

    in_weight     [H, B]        in_bias     [H]       in_gain     [H]
    hidden_weight [L-2, H, H]   hidden_bias [L-2, H]  hidden_gain [L-2, H]
    out_weight    [V, H]        out_bias    [V]

Weights are stored as ``nn.Linear`` stores them: [out_features, in_features].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import AUNNConfig


class AUNNParams(NamedTuple):
    """The eight float32 parameter tensors, with the shapes listed in this module's docstring."""

    in_weight: torch.Tensor
    in_bias: torch.Tensor
    in_gain: torch.Tensor
    hidden_weight: torch.Tensor
    hidden_bias: torch.Tensor
    hidden_gain: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor


def param_shapes(cfg: AUNNConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter, keyed by its name in :class:`AUNNParams`."""
    h, n = cfg.hidden, cfg.hidden_layers
    return {
        "in_weight": (h, cfg.bits),
        "in_bias": (h,),
        "in_gain": (h,),
        "hidden_weight": (n, h, h),
        "hidden_bias": (n, h),
        "hidden_gain": (n, h),
        "out_weight": (cfg.vocab_size, h),
        "out_bias": (cfg.vocab_size,),
    }


def init_params(
    cfg: AUNNConfig, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> AUNNParams:
    """Kaiming-normal (fan-in) weights, zero biases, unit gains, as the seed model."""
    tensors = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("weight"):
            fan_in = shape[-1]
            t = torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
        elif name.endswith("gain"):
            t = torch.ones(shape)
        else:
            t = torch.zeros(shape)
        tensors[name] = t.to(device)
    return AUNNParams(**tensors)
