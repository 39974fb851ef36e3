"""How the kernels are configured and launched, on the host: tile sizes per model shape, the
sigmoid switch, vocabulary ranges, and the launch itself (device guard, ``wrap_triton``).
The kernels' shared device code lives in :mod:`.precision` (matrix products per precision mode),
:mod:`.trunk_blocks` (index bits, SiLU + RMSNorm) and :mod:`.head_blocks` (logits, cross-entropy).

Conventions used by every kernel in this package:

* activations are float32 row-major [N, H] (H = hidden, unpadded in memory); in the bf16
  precision mode the stored activations, the stored dz and the index bits that only feed
  products are bfloat16 (every reader rounds them to bf16 for its product anyway; residual
  sums and everything elementwise stay float32) and are upcast on load;
  inside a kernel a row block is a [BLOCK_M, BLOCK_H] register tile whose columns
  >= H are exactly zero (masked loads with other=0), so sums over the padded tile
  equal sums over the H real columns;
* weights are stored as ``nn.Linear`` stores them, [out, in]; a kernel that needs
  W.T loads it transposed through pointer arithmetic; weights are fp32, except that in the bf16
  mode a large output weight is read as its bf16 copy (``mlp_forward.head_weight``) and, for a
  large batch, the fused kernels read bf16 copies of all of them (``mlp_forward.fused_weights``);
* every matrix product goes through :func:`.precision.dot`, which applies the precision mode
  (operands rounded per mode, accumulation always float32);
* row offsets are int64 so that N * H and N * V may exceed 2**31.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import triton


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



# How the kernels compute SiLU's sigmoid (a benchmarking switch, read at call time):
# "exact" - 1 / (1 + exp(-z)): two special-function-unit ops (ex2, rcp) per element;
# "tanh"  - 0.5 * tanh(z / 2) + 0.5 with tanh.approx.f32: one op, absolute error ~2.5e-4.
#           Used only for bf16 on a GPU (fp32 and tf32 promise more digits than it has;
#           the interpreter cannot run PTX), elsewhere "exact" silently stands in.
# Default "tanh": on an H100 the bf16 forward + argmax at 16M indices ran 1.65x faster with it,
# at the same error against the fp32 reference (kernels/NOTES.md, 2026-11-27).
SIGMOID_CHOICES = ("exact", "tanh")
SIGMOID = os.environ.get("AUNN_FAST_SIGMOID", "tanh")


def checked_switch(value: str, choices: tuple[str, ...], what: str, attribute: str) -> str:
    """A benchmarking switch's value, or a ValueError naming the switch: its environment variable
    (AUNN_FAST_ + the attribute's name) and its module attribute ("module.NAME")."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r} (AUNN_FAST_{attribute.split('.')[-1]} / {attribute}); "
                         f"choose one of {', '.join(choices)}")
    return value


def sigmoid_method() -> str:
    """SIGMOID, checked."""
    return checked_switch(SIGMOID, SIGMOID_CHOICES, "sigmoid", "common.SIGMOID")


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
    num_warps: int      # warps of the forward and of the layer-wise path's per-layer kernels
    num_warps_bwd: int  # warps of the fused trunk backward (aunn_backward_kernel)
    num_warps_head: int  # warps of the head's backward kernels (weight gradient, dh)
    # registers per thread allowed to the fused forward / backward (Triton's maxnreg; 0: the compiler's
    # choice, the default): fewer registers, more blocks per SM, perhaps spills. A kernel_variants candidate,
    # passed only when set (torch.compile's wrap_triton does not take maxnreg as a launch option in torch 2.11)
    max_registers: int = 0
    max_registers_bwd: int = 0
    # software-pipeline stages of the fused forward (Triton's num_stages; 0: Triton's default, 3 on Hopper):
    # each stage keeps a layer's weight tile in shared memory. A kernel_variants candidate, passed only when set
    num_stages: int = 0


def compile_options(max_registers: int, num_stages: int = 0) -> dict[str, int]:
    """The launch options capping a kernel's registers per thread (maxnreg) and setting its pipeline depth
    (num_stages), each only when set (0: the compiler's choice)."""
    options = {"maxnreg": max_registers} if max_registers else {}
    return options | ({"num_stages": num_stages} if num_stages else {})


# A benchmarking hook (bench/kernel_variants.py): Tiles fields replaced in every choose_tiles
# answer, e.g. {"block_m_bwd": 128, "num_warps_bwd": 8}. Empty in normal use.
TILE_OVERRIDES: dict[str, int] = {}


def choose_tiles(hidden: int, bits: int, vocab: int, precision: str, partials: bool = False) -> Tiles:
    """Tiles by the compile report for sm_90a (kernels/NOTES.md): no spill in bf16 where one is avoidable.
    partials: for the fused backward's "partials" weight gradients (mlp_backward.WEIGHT_GRAD)."""
    block_h = max(MIN_TILE_N, next_pow2(hidden))
    fused = hidden <= FUSED_MAX_HIDDEN
    if fused:
        # fp32 holds more registers (FMA products, or tf32x3's operand parts): half the rows, or the
        # forward spills ~300 B (H = 64) / ~130 B (H = 128) with FMAs for ~5% fewer instructions per index
        # bf16 at H = 64: 64 rows on 4 warps ran 1.4x faster than 128 on 8 on an H100 (NOTES.md)
        block_m = (64 if block_h > 64 or precision == "bf16" else 128) // (2 if precision == "fp32" else 1)
        block_m_bwd = 32 if block_h <= 64 else 16
        if precision == "bf16":
            # twice the rows on 4 warps: at H = 64 64 rows ran 1.19x faster than 32 (each warp owns whole
            # rows), at H = 128 32 rows 1.35x faster than 16 on 8 warps, despite the ~1.4 KB spill the compile
            # report shows there (H100, NOTES.md); "partials" on 64 rows fails to compile under Triton 3.6
            block_m_bwd = 32 if partials else 2 * block_m_bwd
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
        # the fused bf16 forward on 4 warps: on an H100 at H = 128 1.78x faster than on 8 (NOTES.md)
        num_warps=4 if (fused and precision == "bf16") else 8,
        # bf16 on 4 warps (compile report, 32 rows: 20% fewer instructions per index than on 8 and no
        # spill at H = 64, at the same 8 warps per SM); tf32 spills 60 B there and fp32 288 B
        num_warps_bwd=4 if (fused and precision == "bf16") else 8,
        # on 4 warps (the forward's at H = 64 in bf16) these spill up to 570 B at vocab 50,257 and
        # issue twice the instructions at vocab 4 (compile report)
        num_warps_head=8,
    )
    return replace(tiles, **TILE_OVERRIDES) if TILE_OVERRIDES else tiles
