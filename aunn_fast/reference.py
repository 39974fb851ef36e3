"""Pure-PyTorch AUNN: the oracle every fast path is tested against.

The math, for indices ``idx`` of any shape and hidden layers l = 1..L-2:

    x      = bits(idx)                                   feature j = (idx >> j) & 1
    h      = RMSNorm(SiLU(x @ in_weight.T + in_bias)) * in_gain ;  res = h
    h      = RMSNorm(SiLU(h @ W_l.T + b_l)) * g_l
             and, when l % residual_every == 0:  h = h + res ;  res = h
    logits = h @ out_weight.T + out_bias

``precision`` rounds the operands of every matrix product ("bf16": to bfloat16,
"tf32": to TensorFloat-32's 10-bit mantissa) and accumulates in the parameters'
dtype; bias, SiLU, RMSNorm and the loss stay in that dtype. Parameters in float64
give the high-precision oracle ("upcast") the tests measure errors against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import AUNNConfig
from .params import AUNNParams
from .rounding import round_to_bf16, round_to_tf32

__all__ = [
    "binary_embedding",
    "hidden_state",
    "logits",
    "loss",
    "predict",
    "round_operand",
    "round_to_bf16",
    "round_to_tf32",
]


def binary_embedding(idx: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int64 [...] -> dtype [..., bits]; feature j is bit j of the index."""
    shifts = torch.arange(bits, device=idx.device, dtype=torch.int64)
    return ((idx.to(torch.int64).unsqueeze(-1) >> shifts) & 1).to(dtype)


def round_operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """Round a matmul operand to what the tensor cores see, keeping x's dtype.

    The gradient passes straight through the rounding, so the backward is the exact
    derivative of the rounded forward.
    """
    if precision == "fp32":
        return x
    if precision == "bf16":
        rounded = round_to_bf16(x.detach()).to(x.dtype)
    elif precision == "tf32":
        rounded = round_to_tf32(x.detach()).to(x.dtype)
    else:
        raise ValueError(f"unknown precision {precision!r}")
    return x + (rounded - x).detach()


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, precision: str) -> torch.Tensor:
    return F.linear(round_operand(x, precision), round_operand(weight, precision), bias)


def _rms_norm(y: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * gain


def hidden_state(idx: torch.Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str = "fp32") -> torch.Tensor:
    """int64 [...] -> [..., H], the input of the output head."""
    eps = cfg.norm_eps
    x = binary_embedding(idx, cfg.bits, params.in_weight.dtype)
    h = _rms_norm(F.silu(_linear(x, params.in_weight, params.in_bias, precision)), params.in_gain, eps)
    res = h
    for layer in range(cfg.hidden_layers):
        z = _linear(h, params.hidden_weight[layer], params.hidden_bias[layer], precision)
        h = _rms_norm(F.silu(z), params.hidden_gain[layer], eps)
        if (layer + 1) % cfg.residual_every == 0:
            h = h + res
            res = h
    return h


def logits(idx: torch.Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str = "fp32") -> torch.Tensor:
    """int64 [...] -> logits [..., V] in the parameters' dtype."""
    h = hidden_state(idx, params, cfg, precision)
    return _linear(h, params.out_weight, params.out_bias, precision)


def loss(
    idx: torch.Tensor,
    targets: torch.Tensor,
    params: AUNNParams,
    cfg: AUNNConfig,
    precision: str = "fp32",
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of targets (int64 [N]) at indices (int64 [N]) under the model: the mean or the
    sum (scalars), or each row's ("none", [N])."""
    z = logits(idx, params, cfg, precision)
    return F.cross_entropy(z.reshape(-1, cfg.vocab_size), targets.reshape(-1).to(torch.int64), reduction=reduction)


def predict(idx: torch.Tensor, params: AUNNParams, cfg: AUNNConfig, precision: str = "fp32") -> torch.Tensor:
    """int64 [...] -> argmax token ids, int64 [...]."""
    return logits(idx, params, cfg, precision).argmax(-1)
