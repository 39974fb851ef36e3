"""The precision modes (fp32, tf32, bf16) as the kernels realise them: the PRECISION constexpr a
launcher passes, and the device functions that honour it: :func:`dot` for every matrix product
(operands rounded per mode, fp32 accumulation) and :func:`store_activation`."""
from __future__ import annotations

import os

import triton
import triton.language as tl

from .common import checked_switch

# How `dot` treats its operands. Under TRITON_INTERPRET=1 a bf16 tl.dot returns garbage
# (anchors.md), so the interpreter gets an exact emulation: operands rounded to bf16 in
# registers, then an exact fp32 product, which is what the tensor cores compute (products of
# rounded operands, fp32 accumulation). tf32 runs the GPU's own code there: its operands are
# rounded in registers on every machine, and the interpreter's product of rounded operands is exact.
PRECISION_CODES = {"fp32": 0, "tf32": 1, "bf16": 2}
INTERPRETER_CODES = {"fp32": 0, "tf32": 1, "bf16": 3}

# How the fp32 mode multiplies (read at call time):
# "tf32x3" - on the tensor cores as three tf32 products (a = a_hi + a_lo with a_hi = a rounded to
#            tf32: a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi), relative error per product ~2^-21
#            against fp32's 2^-24; on an H100 3.0x (predict) and 1.9x (forward + backward) faster than "ieee"
#            at the same error against the reference (kernels/NOTES.md). The interpreter emulates it
#            (code 5, see `dot`);
# "ieee"   - fp32 fused multiply-adds on the FMA units.
FP32_PRODUCTS_CHOICES = ("tf32x3", "ieee")
FP32_PRODUCTS = os.environ.get("AUNN_FAST_FP32_PRODUCTS", "tf32x3")


def fp32_products() -> str:
    """FP32_PRODUCTS, checked."""
    return checked_switch(FP32_PRODUCTS, FP32_PRODUCTS_CHOICES, "fp32 product method", "precision.FP32_PRODUCTS")


def precision_code(precision: str) -> int:
    """The PRECISION constexpr for `dot` on this machine."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if precision == "fp32" and fp32_products() == "tf32x3":
        return 5 if interpreted else 4
    return (INTERPRETER_CODES if interpreted else PRECISION_CODES)[precision]


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """fp32 [M, K] @ fp32 [K, N] -> fp32 [M, N], fp32 accumulation.

    PRECISION 0: exact fp32 (ieee); 1: tf32 tensor cores; 2: bf16 operands; 3: bf16 emulated
    (operands rounded, exact fp32 product) for the interpreter; 4: fp32 as three tf32 products
    (Triton's tf32x3); 5: the same emulated for the interpreter. The tensor cores truncate fp32
    operands to tf32 (triton-lang/triton#4574), the reference rounds them to nearest: so they are
    rounded first, after which truncation changes nothing. tf32x3 splits each operand into its
    nearest tf32 value and the rest, which the tensor cores then truncate.
    """
    if PRECISION == 2:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif PRECISION == 1:
        out = tl.dot(round_tf32(a), round_tf32(b), input_precision="tf32")
    elif PRECISION == 3:
        out = tl.dot(round_bf16(a), round_bf16(b), input_precision="ieee")
    elif PRECISION == 4:
        out = tl.dot(a, b, input_precision="tf32x3")
    elif PRECISION == 5:
        a_hi, b_hi = round_tf32(a), round_tf32(b)
        out = tl.dot(truncate_tf32(a - a_hi), b_hi, input_precision="ieee")
        out += tl.dot(a_hi, truncate_tf32(b - b_hi), input_precision="ieee")
        out += tl.dot(a_hi, b_hi, input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision="ieee")
    return out


@triton.jit
def round_bf16(x):
    """fp32 (or bf16) -> fp32 holding the nearest bfloat16 (ties to even), as torch's .to(torch.bfloat16)."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_tf32(x):
    """fp32 -> fp32 rounded to TensorFloat-32 (10 mantissa bits, nearest), as reference.round_operand."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def truncate_tf32(x):
    """fp32 -> fp32 with the 13 low mantissa bits cleared: what the tensor cores read of an fp32 operand."""
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def store_activation(ptrs, h, mask, PRECISION: tl.constexpr):
    """Store fp32 h at ptrs (fp32, or bf16 rounded to nearest: the GPU's conversion does that, the
    interpreter's truncates, so under PRECISION 3 (emulated bf16) it is rounded first)."""
    if PRECISION == 3 and ptrs.dtype.element_ty == tl.bfloat16:
        h = round_bf16(h)
    tl.store(ptrs, h.to(ptrs.dtype.element_ty), mask=mask)
