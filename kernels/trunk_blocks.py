"""Device functions of the trunk: an index's bits as a GEMM operand, and each layer's
SiLU + RMSNorm * gain with its backward (fp32 elementwise math, padded columns kept at 0)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def index_bits(idx, k, BITS: tl.constexpr):
    """int64 idx [M], int32 bit positions k [K] -> fp32 [M, K]: bit k of idx, 0 where k >= BITS."""
    shift = tl.minimum(k, 63).to(tl.int64)
    bit = (idx[:, None] >> shift[None, :]) & 1
    return tl.where(k[None, :] < BITS, bit, 0).to(tl.float32)


@triton.jit
def tanh_approx(x):
    """fp32 tanh by PTX tanh.approx.f32: one special-function op, absolute error ~5e-4 (NVIDIA GPUs only)."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def sigmoid(z, FAST_SIGMOID: tl.constexpr):
    """fp32 sigmoid: 1 / (1 + exp(-z)) (an exp and a reciprocal, each with range fix-ups), or with
    FAST_SIGMOID 0.5 * tanh(z / 2) + 0.5 (one tanh_approx)."""
    if FAST_SIGMOID:
        return 0.5 * tanh_approx(0.5 * z) + 0.5
    else:
        return tl.sigmoid(z)


@triton.jit
def silu(z, FAST_SIGMOID: tl.constexpr):
    """fp32 z * sigmoid(z); with FAST_SIGMOID as z/2 * tanh(z/2) + z/2: a multiply, a tanh and an FMA."""
    if FAST_SIGMOID:
        half = 0.5 * z
        return half * tanh_approx(half) + half
    else:
        return z * tl.sigmoid(z)


@triton.jit
def silu_rmsnorm(z, gain, H, eps, FAST_SIGMOID: tl.constexpr):
    """z fp32 [M, BLOCK_H] (padded columns 0), gain [BLOCK_H] -> RMSNorm(SiLU(z)) * gain over the H real columns."""
    s = silu(z, FAST_SIGMOID)
    # torch.compile's generated launcher passes a float argument as fp64: keep the tile in fp32
    inv_rms = tl.rsqrt(tl.sum(s * s, axis=1) / H + tl.cast(eps, tl.float32))
    return s * inv_rms[:, None] * gain[None, :]


@triton.jit
def silu_rmsnorm_backward(dy, z, gain, H, eps, FAST_SIGMOID: tl.constexpr):
    """For y = RMSNorm(SiLU(z)) * gain: dL/dy [M, BLOCK_H] -> (dL/dz [M, BLOCK_H], dL/dgain summed over rows [BLOCK_H]).

    With s = SiLU(z), r = rsqrt(mean(s^2) + eps), n = s * r:
        dgain = sum_rows(dy * n);  dn = dy * gain;  ds = r * (dn - n * mean(dn * n));  dz = ds * SiLU'(z).
    """
    sig = sigmoid(z, FAST_SIGMOID)
    s = z * sig
    inv_rms = tl.rsqrt(tl.sum(s * s, axis=1) / H + tl.cast(eps, tl.float32))
    n = s * inv_rms[:, None]
    dgain = tl.sum(dy * n, axis=0)
    dn = dy * gain[None, :]
    ds = inv_rms[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / H)[:, None])
    dz = ds * (sig * (1.0 + z * (1.0 - sig)))
    return dz, dgain
