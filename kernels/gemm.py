"""The matrix products the kernels leave to PyTorch (cuBLAS), in the package's precision modes.

A product in mode ``precision`` is what tensor cores compute: operands rounded (bf16, tf32),
products exact, fp32 accumulation and an fp32 result. The layer-wise path's GEMMs and the
weight-gradient GEMMs of the "torch" method go through :func:`matmul`.
"""
from __future__ import annotations

import torch

from aunn_fast.reference import round_operand


def operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """x as a GEMM operand: bf16 for "bf16" (x itself when already bf16), tf32-rounded fp32 for
    "tf32", x for "fp32". :func:`matmul` applies it to both operands; in bf16 a tensor cast once
    beforehand (the hidden weights, for every layer) costs no further cast there."""
    if precision == "bf16":
        return x.to(torch.bfloat16)
    if precision == "tf32":
        return round_operand(x, "tf32")
    return x


def matmul(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """fp32 [M, N] = a [M, K] @ b [K, N] (or batched, [B, M, K] @ [B, K, N]) in mode precision.

    bf16 on CUDA: a bf16 cuBLAS GEMM with an fp32 output (``out_dtype``), so the result is not
    rounded to bf16; elsewhere the bf16 values multiplied in fp32, which is exact for products
    of bf16 values. tf32: operands rounded in PyTorch, then an fp32 GEMM (exact emulation at
    fp32 speed; PyTorch's global allow_tf32 switch is left alone).
    """
    a, b = operand(a, precision), operand(b, precision)
    if a.dtype == torch.bfloat16:
        if a.is_cuda:
            product = torch.mm if a.dim() == 2 else torch.bmm
            return product(a, b, out_dtype=torch.float32)
        return torch.matmul(a.float(), b.float())
    return torch.matmul(a, b)
