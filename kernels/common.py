"""Triton building blocks shared by the forward and backward kernels, and the tile choices.

Conventions used by every kernel in this package:

* activations are float32 row-major [N, H] (H = hidden, unpadded in memory); in the bf16
  precision mode the stored activations, the stored dz and the index bits that only feed
  products are bfloat16 (every reader rounds them to bf16 for its product anyway; residual
  sums and everything elementwise stay float32) and are upcast on load;
  inside a kernel a row block is a [BLOCK_M, BLOCK_H] register tile whose columns
  >= H are exactly zero (masked loads with other=0), so sums over the padded tile
  equal sums over the H real columns;
* weights are stored as ``nn.Linear`` stores them, [out, in]; a kernel that needs
  W.T loads it transposed through pointer arithmetic; weights are fp32, except that a
  large output weight is read as its bf16 copy in the bf16 mode (``mlp_forward.head_weight``);
* every matrix product goes through :func:`dot`, which applies the precision mode
  (operands rounded per mode, accumulation always float32);
* row offsets are int64 so that N * H and N * V may exceed 2**31.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

# How `dot` treats its operands. Under TRITON_INTERPRET=1 a bf16 tl.dot returns garbage
# (anchors.md), so the interpreter gets an exact emulation: operands rounded to bf16 in
# registers, then an exact fp32 product, which is what the tensor cores compute (products of
# rounded operands, fp32 accumulation). tf32 runs the GPU's own code there: its operands are
# rounded in registers on every machine, and the interpreter's product of rounded operands is exact.
PRECISION_CODES = {"fp32": 0, "tf32": 1, "bf16": 2}
INTERPRETER_CODES = {"fp32": 0, "tf32": 1, "bf16": 3}


def _patch_interpreter_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns a scalar kernel argument into a 1-element 1-D array and
    implements ``range(n)`` through ``int(array)``, which NumPy >= 2.4 rejects ("only 0-dimensional
    arrays can be converted to Python scalars"). Re-point that one conversion at ``.item()``.
    Only touches Triton's interpreter, and only when it is in use."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - other Triton layouts
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_aunn_numpy_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._aunn_numpy_fix = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_for_numpy_2_4()


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch through ``torch.library.wrap_triton`` (traceable by torch.compile / export).

    In the interpreter the operators are opaque custom_ops (see ops.py), so the kernel is
    launched directly (torch 2.13's wrap_triton would hand it back unchanged, torch 2.11's
    refuses an interpreted kernel), and not at all on the fake tensors torch.compile and
    opcheck trace with: the traced graph only needs the output buffers' shapes.
    """
    import torch
    from torch._subclasses.fake_tensor import is_fake
    from torch.library import wrap_triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        if not any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
            kernel[grid](*args, **kwargs)
        return
    wrap_triton(kernel)[grid](*args, **kwargs)


def on_device_of(tensor: torch.Tensor):
    """A context in which the tensor's CUDA device is the current one (no-op off CUDA).

    Triton compiles for and launches on the current device, whatever device the tensors
    are on: without this, a model on cuda:1 while cuda:0 is current would have its kernels
    launched on cuda:0 with pointers into cuda:1's memory.
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


def precision_code(precision: str) -> int:
    """The PRECISION constexpr for `dot` on this machine."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return INTERPRETER_CODES[precision]
    return PRECISION_CODES[precision]


# How the kernels compute SiLU's sigmoid (a benchmarking switch, read at call time):
# "exact" - 1 / (1 + exp(-z)): two special-function-unit ops (ex2, rcp) per element;
# "tanh"  - 0.5 * tanh(z / 2) + 0.5 with tanh.approx.f32: one op, absolute error ~2.5e-4.
#           Used only for bf16 on a GPU (fp32 and tf32 promise more digits than it has;
#           the interpreter cannot run PTX), elsewhere "exact" silently stands in.
SIGMOID_CHOICES = ("exact", "tanh")
SIGMOID = os.environ.get("AUNN_FAST_SIGMOID", "exact")


def sigmoid_method() -> str:
    """SIGMOID, checked: a ValueError naming the switch for an unknown value."""
    if SIGMOID not in SIGMOID_CHOICES:
        raise ValueError(f"unknown sigmoid {SIGMOID!r} (AUNN_FAST_SIGMOID / common.SIGMOID); "
                         f"choose one of {', '.join(SIGMOID_CHOICES)}")
    return SIGMOID


def fast_sigmoid(precision: str) -> bool:
    """The FAST_SIGMOID constexpr of every kernel for this precision, from SIGMOID."""
    return sigmoid_method() == "tanh" and precision == "bf16" and os.environ.get("TRITON_INTERPRET") != "1"


# Output tiles narrower than this crashed a Triton 3.6 kernel on an H100 (anchors.md),
# so every dot output (hidden width, vocabulary chunk) is padded to at least 64 columns.
MIN_TILE_N = 64

# Hidden widths up to this run the whole trunk in registers (one launch); wider models run
# layer by layer: a cuBLAS GEMM, then one fused epilogue launch. Read at call time, so
# tests may lower it to exercise the layer-wise path on small shapes.
FUSED_MAX_HIDDEN = 128


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; elsewhere (the interpreter) 4, so that the
    tests' small grids still split their work as a GPU's do."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# The head loops over the vocabulary inside each program, so a grid of row blocks alone has as
# many programs as row blocks: with a short prompt and a large vocabulary (conditioning at vocab
# 50,257) one program would stream the whole output weight, 51 MB in fp32 at H = 256, through one
# SM. From VOCAB_SPLIT_MIN entries on, a grid with fewer than VOCAB_SPLIT_PROGRAMS_PER_SM
# programs per SM cuts the vocabulary into contiguous ranges, one per program; the ranges'
# partial results are combined afterwards (softmax statistics, argmax, dL/dh). Smaller heads
# cost little next to the trunk, which a fused program would recompute for every range.
VOCAB_SPLIT_MIN = 4096
VOCAB_SPLIT_PROGRAMS_PER_SM = 2


def vocab_splits(row_programs: int, vocab: int, block_v: int, device: torch.device) -> tuple[int, int]:
    """(ranges, entries per range) of the head's vocabulary for a grid of row_programs programs;
    the entries per range are a multiple of block_v, and no range is empty."""
    tiles = triton.cdiv(vocab, block_v)
    wanted = 1
    if vocab >= VOCAB_SPLIT_MIN:
        wanted = min(tiles, triton.cdiv(VOCAB_SPLIT_PROGRAMS_PER_SM * num_sms(device), max(row_programs, 1)))
    tiles_per_range = triton.cdiv(tiles, wanted)
    return triton.cdiv(tiles, tiles_per_range), tiles_per_range * block_v


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


@dataclass(frozen=True)
class Tiles:
    """Tile sizes for one model shape (all powers of two, dot dims >= 16)."""

    fused: bool       # whole trunk in registers
    block_h: int      # padded hidden width (>= 64)
    block_bits: int   # padded bit count (>= 16, <= 64)
    block_m: int      # rows per program, forward (on the layer-wise path: the head's)
    block_m_bwd: int  # rows per program, backward of the fused trunk
    block_m_head: int  # rows per program of the head's backward kernels (weight gradient, dh)
    block_m_rowwise: int  # rows per program of the layer-wise path's per-layer kernels (~8K elements)
    block_v: int      # vocabulary chunk of the head (>= 64)
    block_hc: int     # hidden-column chunk of the head backward kernels
    block_k_head: int # reduction chunk of the head when it streams h from memory
    num_warps: int
    num_warps_bwd: int  # warps of the fused trunk backward (aunn_backward_kernel)


# A benchmarking hook (bench/kernel_variants.py): Tiles fields replaced in every choose_tiles
# answer, e.g. {"block_m_bwd": 128, "num_warps_bwd": 8}. Empty in normal use.
TILE_OVERRIDES: dict[str, int] = {}


def choose_tiles(hidden: int, bits: int, vocab: int, precision: str) -> Tiles:
    """Tiles by the compile report for sm_90a (kernels/NOTES.md): no spill in bf16 where one is avoidable."""
    block_h = max(MIN_TILE_N, next_pow2(hidden))
    fused = hidden <= FUSED_MAX_HIDDEN
    if fused:
        # fp32 products run on the FMA units and hold more registers: half the rows, or the
        # forward spills ~300 B (H = 64) / ~130 B (H = 128) for ~5% fewer instructions per index
        block_m = (128 if block_h <= 64 else 64) // (2 if precision == "fp32" else 1)
        block_m_bwd = 32 if block_h <= 64 else 16
    else:
        # off the fused path block_m is the forward head's rows, and block_m_bwd has no reader:
        # the per-layer kernels take block_m_rowwise rows, the head's backward block_m_head
        block_m = 64 // (2 if precision == "fp32" else 1)
        block_m_bwd = block_m
    tiles = Tiles(
        fused=fused,
        block_h=block_h,
        block_bits=max(16, next_pow2(bits)),
        block_m=block_m,
        block_m_bwd=block_m_bwd,
        # 64 rows: per multiply-add 1.7-2.9x fewer instructions than 16-32 rows (bf16), no spill
        block_m_head=64,
        # the SiLU/RMSNorm backward holds ~6 tiles live: 16 rows of 1,024 spill ~300 B, 8 do not
        block_m_rowwise=max(1, 8192 // block_h),
        # fp32 heads of 128 columns spill 250-1,000 B at H = 64 (vocab 50,257)
        block_v=128 if (vocab > 64 and block_h <= 64 and precision != "fp32") else 64,
        block_hc=min(block_h, 128),
        block_k_head=block_h if fused else 64,
        num_warps=8,
        # bf16, 32 rows on 4 warps: 20% fewer instructions per index than on 8 and no spill, at
        # the same 8 warps per SM (registers); tf32 spills 60 B there and fp32 288 B
        num_warps_bwd=4 if (fused and block_h <= 64 and precision == "bf16") else 8,
    )
    return replace(tiles, **TILE_OVERRIDES) if TILE_OVERRIDES else tiles


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """fp32 [M, K] @ fp32 [K, N] -> fp32 [M, N], fp32 accumulation.

    PRECISION 0: exact fp32 (ieee); 1: tf32 tensor cores; 2: bf16 operands; 3: bf16 emulated
    (operands rounded, exact fp32 product) for the interpreter. The tensor cores truncate fp32
    operands to tf32 (triton-lang/triton#4574), the reference rounds them to nearest: so they are
    rounded first, after which truncation changes nothing.
    """
    if PRECISION == 2:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif PRECISION == 1:
        out = tl.dot(round_tf32(a), round_tf32(b), input_precision="tf32")
    elif PRECISION == 3:
        out = tl.dot(round_bf16(a), round_bf16(b), input_precision="ieee")
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
def store_activation(ptrs, h, mask, PRECISION: tl.constexpr):
    """Store fp32 h at ptrs (fp32, or bf16 rounded to nearest: the GPU's conversion does that, the
    interpreter's truncates, so under PRECISION 3 (emulated bf16) it is rounded first)."""
    if PRECISION == 3 and ptrs.dtype.element_ty == tl.bfloat16:
        h = round_bf16(h)
    tl.store(ptrs, h.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def index_bits(idx, k, BITS: tl.constexpr):
    """int64 idx [M], int32 bit positions k [K] -> fp32 [M, K]: bit k of idx, 0 where k >= BITS."""
    shift = tl.minimum(k, 63).to(tl.int64)
    bit = (idx[:, None] >> shift[None, :]) & 1
    return tl.where(k[None, :] < BITS, bit, 0).to(tl.float32)


@triton.jit
def tanh_approx(x):
    """fp32 tanh by PTX tanh.approx.f32: one special-function op, absolute error ~5e-4 (NVIDIA GPUs only)."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


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
    inv_rms = tl.rsqrt(tl.sum(s * s, axis=1) / H + eps)
    return s * inv_rms[:, None] * gain[None, :]


@triton.jit
def silu_rmsnorm_backward(dy, z, gain, H, eps, FAST_SIGMOID: tl.constexpr):
    """For y = RMSNorm(SiLU(z)) * gain: dL/dy [M, BLOCK_H] -> (dL/dz [M, BLOCK_H], dL/dgain summed over rows [BLOCK_H]).

    With s = SiLU(z), r = rsqrt(mean(s^2) + eps), n = s * r:
        dgain = sum_rows(dy * n);  dn = dy * gain;  ds = r * (dn - n * mean(dn * n));  dz = ds * SiLU'(z).
    """
    sig = sigmoid(z, FAST_SIGMOID)
    s = z * sig
    inv_rms = tl.rsqrt(tl.sum(s * s, axis=1) / H + eps)
    n = s * inv_rms[:, None]
    dgain = tl.sum(dy * n, axis=0)
    dn = dy * gain[None, :]
    ds = inv_rms[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / H)[:, None])
    dz = ds * (sig * (1.0 + z * (1.0 - sig)))
    return dz, dgain


@triton.jit
def head_logits_tile(h_ptr, rows, row_mask, w_ptr, b_ptr, vcols, vmask, H,
                     BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                     PRECISION: tl.constexpr):
    """Logits [BLOCK_M, BLOCK_V] = h[rows] @ w[vcols].T + b[vcols]; -inf in the columns past the vocabulary,
    so that softmax and argmax need no mask.

    h fp32/bf16 [N, H] is streamed from memory in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < H
        a = tl.load(h_ptr + rows[:, None] * H + k[None, :], mask=row_mask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + vcols[None, :] * H + k[:, None], mask=kmask[:, None] & vmask[None, :], other=0.0)
        acc += dot(a, wt, PRECISION)
    return acc + tl.load(b_ptr + vcols, mask=vmask, other=float("-inf"))[None, :]


@triton.jit
def log1p(x):
    """log(1 + x) for x >= 0 with x's own digits when x is tiny (Kahan: log(u) * x / (u - 1), u = 1 + x)."""
    u = 1.0 + x
    rounded = u - 1.0
    return tl.where(rounded == 0.0, x, tl.log(u) * (x / tl.where(rounded == 0.0, 1.0, rounded)))


@triton.jit
def cross_entropy_stats(row_max, other_sum, target_logit):
    """Per row (cross-entropy, log_sum, 1 - p_target), fp32 [M] each, from the row's max logit, the sum of
    exp(logit - max) over the non-target entries and the target's logit; log_sum = log of the whole sum.

    A confident row (p_target near 1) is the common case once an AUNN has memorised its data. There
    log(sum) = log(1 + other_sum) and p_target - 1 would round other_sum's digits away, the loss and the
    target's gradient with them (PyTorch's, at a loss of 1e-7, are off by 15%); from other_sum both
    keep full precision: the loss is log1p(other_sum) when the target is the max, 1 - p_target is
    other_sum / sum.
    """
    total = other_sum + tl.exp(target_logit - row_max)
    log_sum = tl.log(total)
    row_loss = tl.where(target_logit == row_max, log1p(other_sum), (row_max - target_logit) + log_sum)
    return row_loss, log_sum, other_sum / total


@triton.jit
def load_softmax_stats(stats_ptr, rows, row_mask):
    """Per-row (max logit, log of the sum of exp(logit - max), 1 - p_target), fp32 [M] each, from stats
    fp32 [N, 3] (:func:`cross_entropy_stats`).

    Max and log-sum are kept apart rather than as one logsumexp: when one logit dominates, log-sum is
    tiny and max + log-sum would round most of its digits away.
    """
    row_max = tl.load(stats_ptr + 3 * rows, mask=row_mask, other=0.0)
    log_sum = tl.load(stats_ptr + 3 * rows + 1, mask=row_mask, other=0.0)
    target_complement = tl.load(stats_ptr + 3 * rows + 2, mask=row_mask, other=0.0)
    return row_max, log_sum, target_complement


@triton.jit
def load_targets(target_ptr, rows, row_mask):
    """Targets int32 [M] of int64 targets [N]: the vocabulary is at most 65,536, and the vocabulary
    columns they are compared with are int32 (an int64 compare costs two instructions)."""
    return tl.load(target_ptr + rows, mask=row_mask, other=0).to(tl.int32)


@triton.jit
def dlogits(logits, row_max, log_sum, target_complement, target, grad_row, vcols, row_mask):
    """d(sum_rows grad_row * CE)/d logits for one tile: (softmax - onehot(target)) * grad_row, the target's
    entry -(1 - p_target) as the forward computed it.

    0 in the masked rows, and in the columns past the vocabulary (their logits are -inf)."""
    p = tl.exp((logits - row_max[:, None]) - log_sum[:, None])
    d = tl.where(vcols[None, :] == target[:, None], -target_complement[:, None], p) * grad_row[:, None]
    return tl.where(row_mask[:, None], d, 0.0)


@triton.jit
def head_backward_rows(h_ptr, target_ptr, grad_ptr, stats_ptr, w_ptr, b_ptr, rows, row_mask, hcols, hmask,
                       H, V, v_begin, v_end, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_HC: tl.constexpr, PRECISION: tl.constexpr):
    """dL/dh[rows, hcols] [BLOCK_M, BLOCK_HC] of the loss sum_rows grad_row * CE(h @ w.T + b, target),
    the vocabulary entries [v_begin, v_end) only (v_begin a multiple of BLOCK_V).

    h is fp32 or bf16 [N, H].

    Logits are recomputed chunk by chunk from h [N, H] and the saved softmax stats [N, 3]; never stored.
    """
    row_max, log_sum, target_complement = load_softmax_stats(stats_ptr, rows, row_mask)
    target = load_targets(target_ptr, rows, row_mask)
    grad_row = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    dh = tl.zeros((BLOCK_M, BLOCK_HC), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        vcols = v0 + tl.arange(0, BLOCK_V)
        vmask = vcols < V
        logits = head_logits_tile(h_ptr, rows, row_mask, w_ptr, b_ptr, vcols, vmask, H,
                                  BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)
        d = dlogits(logits, row_max, log_sum, target_complement, target, grad_row, vcols, row_mask)
        w = tl.load(w_ptr + vcols[:, None] * H + hcols[None, :], mask=vmask[:, None] & hmask[None, :], other=0.0)
        dh += dot(d, w, PRECISION)
    return dh
