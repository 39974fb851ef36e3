"""The matrix products the kernels leave to PyTorch (cuBLAS), in the package's precision modes.

A product in mode ``precision`` is what tensor cores compute: operands rounded (bf16, tf32),
products exact, fp32 accumulation and an fp32 result. The layer-wise path's GEMMs, the
weight-gradient GEMMs of the "torch" method and the ``logits()`` backward's head products go
through :func:`matmul`. In the fp32 mode they are plain fp32 GEMMs, so, like the reference's
own, they follow PyTorch's global TF32 switch (``torch.backends.cuda.matmul``) if a user sets it.
"""
from __future__ import annotations

import torch

from aunn_fast.reference import round_to_tf32


def reusable_operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """x cast once ahead of several :func:`matmul` calls (the hidden weights, one per layer): its bf16
    copy in the bf16 mode, so that matmul casts no more; else x itself (tf32 rounding stays per call)."""
    return x.to(torch.bfloat16) if precision == "bf16" else x


def matmul(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """fp32 [M, N] = a [M, K] @ b [K, N] (or batched, [B, M, K] @ [B, K, N]) in mode precision.

    bf16: operands cast to bf16 (free when already bf16); on CUDA a bf16 cuBLAS GEMM with an fp32
    output (``out_dtype``, torch >= 2.8), so the result is not rounded to bf16; elsewhere the bf16
    values multiplied in fp32, exact for products of bf16 values. tf32: operands rounded in
    PyTorch, then an fp32 GEMM (exact emulation at fp32 speed; PyTorch's global TF32 switch is
    left alone). fp32: an fp32 GEMM.
    """
    if precision == "bf16":
        a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
        if a.is_cuda:
            product = torch.mm if a.dim() == 2 else torch.bmm
            return product(a, b, out_dtype=torch.float32)
        return torch.matmul(a.float(), b.float())
    if precision == "tf32":
        return torch.matmul(round_to_tf32(a), round_to_tf32(b))
    return torch.matmul(a, b)
