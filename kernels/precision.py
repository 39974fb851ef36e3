"""The precision modes (fp32, tf32, bf16) as the kernels realise them: the device functions that honour a
kernel's PRECISION constexpr (its codes: ``config.precision_code``): :func:`dot` for every matrix product
(operands rounded per mode, fp32 accumulation) and :func:`store_activation`.

Under TRITON_INTERPRET=1 a bf16 tl.dot returns garbage, so the interpreter gets an exact emulation:
operands rounded to bf16 in registers, then an exact fp32 product, which is what the tensor cores compute
(products of rounded operands, fp32 accumulation). tf32 runs the GPU's own code there: its operands are
rounded in registers on every machine, and the interpreter's product of rounded operands is exact.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """fp32 [M, K] @ fp32 [K, N] -> fp32 [M, N], fp32 accumulation.

    PRECISION 0: exact fp32 (ieee); 1: tf32 tensor cores; 2: bf16 operands; 3: bf16 emulated
    (operands rounded, exact fp32 product) for the interpreter; 4: fp32 as three tf32 products
    (Triton's tf32x3; a = a_hi + a_lo with a_hi = a rounded to tf32: a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi,
    relative error per product ~2^-21 against fp32's 2^-24); 5: the same emulated for the interpreter.
    The tensor cores truncate fp32
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
    """fp32 -> fp32 rounded to TensorFloat-32 (10 mantissa bits, nearest), as the reference's operand rounding."""
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
