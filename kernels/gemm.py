"""The matrix products the kernels leave to PyTorch (cuBLAS), in the package's precision modes.

A product in mode ``precision`` is what tensor cores compute: operands rounded (bf16, tf32),
products exact, fp32 accumulation and an fp32 result. The layer-wise path's GEMMs, the
weight-gradient GEMMs of the "torch" method and the ``logits()`` backward's head products go
through :func:`matmul`. In the fp32 mode they are plain fp32 GEMMs, so, like the reference's
own, they follow PyTorch's global TF32 switch (``torch.backends.cuda.matmul``) if a user sets it.
"""

from __future__ import annotations

import math

import torch

from aunn_fast.rounding import round_to_tf32


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


# A weight gradient sums over the batch: [H_out, N] @ [N, H_in], N up to millions, H_out x H_in one
# output tile at H = 64. A batched cuBLAS product runs about one block per output tile, without
# splitting N, so a handful of SMs would stream the whole batch. batch_reduced_matmul cuts N into
# S equal chunks (S a power of two dividing N, at most SPLIT_K_MAX, chunks of at least min_rows rows
# (KernelOptions.split_k_min_rows), the S partial results at most SPLIT_K_MAX_PARTIALS fp32 elements:
# a large output has tiles enough), runs one batched product over all chunks and sums the partials.
# (min_rows 1,024: DESIGN.md, "Weight gradients".)
SPLIT_K_MAX = 256
SPLIT_K_MAX_PARTIALS = 1 << 24


def batch_reduced_matmul(dz: torch.Tensor, a: torch.Tensor, precision: str, min_rows: int) -> torch.Tensor:
    """fp32 [..., H_out, H_in] = dz[..., N, H_out].T @ a[..., N, H_in] in mode precision (one optional
    leading batch dim, e.g. layers; both contiguous), the sum over N split into chunks of at least min_rows
    rows (see above)."""
    n = dz.shape[-2]
    out_elements = math.prod(dz.shape[:-2]) * dz.shape[-1] * a.shape[-1]
    splits = 1
    while (
        splits < SPLIT_K_MAX
        and n % (2 * splits) == 0
        and n // (2 * splits) >= min_rows
        and 2 * splits * out_elements <= SPLIT_K_MAX_PARTIALS
    ):
        splits *= 2
    if splits == 1:
        return matmul(dz.transpose(-1, -2), a, precision)
    batch, rows = math.prod(dz.shape[:-2]) * splits, n // splits
    partial = matmul(
        dz.reshape(batch, rows, dz.shape[-1]).transpose(1, 2), a.reshape(batch, rows, a.shape[-1]), precision
    )
    return partial.view(*dz.shape[:-2], splits, *partial.shape[1:]).sum(-3)
