"""Operand rounding to the tensor cores' formats, in PyTorch: what the reference (the oracle) and the fast
paths' PyTorch GEMMs (aunn_fast.kernels.gemm) both apply. Part of the base layer (with config.py and
params.py): imports nothing else of aunn_fast."""

from __future__ import annotations

import torch


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """x as float32 rounded to TensorFloat-32 (nearest, 10 mantissa bits), still float32; no autograd."""
    as_int = x.float().view(torch.int32)
    return ((as_int + 0x1000) & ~0x1FFF).view(torch.float32)


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """x as float32 rounded to bfloat16 (nearest, ties to even), still float32; no autograd. In integer
    arithmetic, as the tf32 rounding: torch.compile's Inductor drops a float32 -> bfloat16 -> float32 round
    trip (it keeps bf16 values in float32), which left the compile backend computing in fp32."""
    x = x.float()
    as_int = x.view(torch.int32)
    rounded = ((as_int + (0x7FFF + ((as_int >> 16) & 1))) & -0x10000).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded)  # a NaN's carry would wrap to -0
