"""How the kernels are configured, as values: what a caller may choose (:class:`KernelOptions`) and what one
call runs with (:class:`KernelConfig`: tiles, warps, methods), chosen by :func:`choose_config`, a pure function
of the model's shape, the precision, the device (:class:`DeviceTraits`) and the options.

The options reach the kernels explicitly: ``ops`` passes them to its operators as one string
(``KernelOptions.encoded``), so that torch.compile's caches are keyed by them, and each launcher takes
the :class:`KernelConfig` its operator chose. The only process-wide state is :func:`default_options`,
the environment switches read once. This module does not import Triton (compile_check and the benchmark
read it without loading Triton). The measurements behind the defaults are in kernels/DESIGN.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from functools import cache, lru_cache

import torch

WEIGHT_GRAD_METHODS = ("torch", "partials")
SIGMOID_METHODS = ("exact", "tanh")
FP32_PRODUCT_METHODS = ("tf32x3", "ieee")
HEAD_BACKWARD_METHODS = ("kernels", "products")
# option field: its environment variable (read once, by default_options)
ENVIRONMENT = {
    "weight_grad": "AUNN_FAST_WEIGHT_GRAD",
    "sigmoid": "AUNN_FAST_SIGMOID",
    "fp32_products": "AUNN_FAST_FP32_PRODUCTS",
}
_METHODS = {
    "weight_grad": ("trunk weight-gradient method", WEIGHT_GRAD_METHODS),
    "sigmoid": ("sigmoid", SIGMOID_METHODS),
    "fp32_products": ("fp32 product method", FP32_PRODUCT_METHODS),
    "head_backward": ("head backward method", HEAD_BACKWARD_METHODS),
}

# Output tiles narrower than this crashed a Triton 3.6 kernel on an H100 (DESIGN.md, "Tiles"),
# so every dot output (hidden width, vocabulary chunk) is padded to at least 64 columns.
MIN_TILE_N = 64


@dataclass(frozen=True)
class KernelOptions:
    """The kernels' methods and thresholds. The defaults are the production configuration; every other
    value is a benchmark candidate (bench/kernel_variants.py) or a test's way to reach a path at small shapes.

    weight_grad:    the fused trunk's weight gradients: "torch" (the kernel writes dz, PyTorch GEMMs sum
                    dz.T @ a) or "partials" (a persistent grid sums dz.T @ a per program; dz never stored).
                    The layer-wise path always uses "torch". Environment: AUNN_FAST_WEIGHT_GRAD.
    sigmoid:        SiLU's sigmoid in bf16 on a GPU: "tanh" (tanh.approx.f32, one special-function op) or
                    "exact" (1 / (1 + exp(-z))); fp32, tf32 and the interpreter always use "exact".
                    Environment: AUNN_FAST_SIGMOID.
    fp32_products:  how the fp32 mode multiplies: "tf32x3" (three tf32 tensor-core products) or "ieee"
                    (fp32 FMAs). Environment: AUNN_FAST_FP32_PRODUCTS.
    head_backward:  the head's backward where head_dh_kernel would run (layer-wise path; fused path with a
                    split vocabulary): "kernels", or "products" (PyTorch GEMMs on dlogits materialised
                    head_gemm_chunk_elements logits at a time; a candidate no GPU has timed yet).
    head_grads_in_trunk: small heads' gradients summed by the fused trunk backward (False: by
                    head_weight_grad_kernel, a candidate).
    load_weight_once: the fused trunk backward reads each hidden weight once as stored (False: as W.T, a
                    candidate).
    fused_max_hidden: hidden widths up to this run the whole trunk in registers; wider ones layer by layer.
    vocab_split_min: from this vocabulary size on, a grid of few row blocks splits the head's vocabulary into
                    ranges (:func:`vocab_splits`).
    split_k_min_rows: the weight-gradient GEMMs' batch chunks are at least this many rows (gemm).
    weight_copy_min_rows: from this many rows on, the fused bf16 kernels read bf16 copies of the weights.
    head_copy_min_elements, head_copy_min_rows: from an output weight this large and this many rows on, the
                    bf16 head reads a bf16 copy of it.
    partial_programs_per_sm, rowwise_programs_per_sm: persistent grids of the "partials" trunk backward and of
                    the layer-wise backward, in programs per SM.
    tiles:          (Tiles field, value) pairs replacing :func:`choose_tiles`' answer (candidates).
    poison_outputs: fill every buffer a launcher allocates with NaN / -1 (tests: an unwritten element shows).
    """

    weight_grad: str = "torch"
    sigmoid: str = "tanh"
    fp32_products: str = "tf32x3"
    head_backward: str = "kernels"
    head_grads_in_trunk: bool = True
    load_weight_once: bool = True
    fused_max_hidden: int = 128
    vocab_split_min: int = 4096
    split_k_min_rows: int = 1024
    weight_copy_min_rows: int = 16384
    head_copy_min_elements: int = 1 << 20
    head_copy_min_rows: int = 256
    head_gemm_chunk_elements: int = 1 << 27
    partial_programs_per_sm: int = 2
    rowwise_programs_per_sm: int = 2
    tiles: tuple[tuple[str, int], ...] = ()
    poison_outputs: bool = False

    def __post_init__(self) -> None:
        for name, (what, choices) in _METHODS.items():
            value = getattr(self, name)
            if value not in choices:
                source = f"{ENVIRONMENT[name]} / " if name in ENVIRONMENT else ""
                raise ValueError(
                    f"unknown {what} {value!r} ({source}KernelOptions.{name}); choose one of {', '.join(choices)}"
                )
        known = {f.name for f in fields(Tiles)}
        unknown = [name for name, _ in self.tiles if name not in known]
        if unknown:
            raise ValueError(f"unknown Tiles field(s) {', '.join(unknown)} in KernelOptions.tiles")
        # the options as one string (JSON, sorted keys): how they reach the torch.library operators. Made here,
        # so that torch.compile, tracing a call, reads an attribute instead of tracing json.dumps
        object.__setattr__(self, "encoded", json.dumps(asdict(self), sort_keys=True))

    @staticmethod
    @lru_cache(maxsize=64)
    def decode(text: str) -> KernelOptions:
        """The options whose ``encoded`` string text is."""
        values = json.loads(text)
        values["tiles"] = tuple((name, value) for name, value in values["tiles"])
        return KernelOptions(**values)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> KernelOptions:
        """The defaults with the AUNN_FAST_* switches set in environ; a ValueError naming a bad one."""
        return cls(**{name: environ[variable] for name, variable in ENVIRONMENT.items() if variable in environ})


@cache
def default_options() -> KernelOptions:
    """The options of callers that pass none: :meth:`KernelOptions.from_environment`, read once per process."""
    return KernelOptions.from_environment()


@dataclass(frozen=True)
class DeviceTraits:
    """What the configuration depends on of the device: its streaming multiprocessors (4 in the interpreter,
    so that the tests' small grids still split their work as a GPU's do) and whether Triton interprets."""

    sms: int
    interpreted: bool


def device_traits(device: torch.device) -> DeviceTraits:
    """The traits of a CUDA device, or of the CPU under TRITON_INTERPRET=1."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda" and not interpreted:
        return DeviceTraits(torch.cuda.get_device_properties(device).multi_processor_count, False)
    return DeviceTraits(4, interpreted)


@dataclass(frozen=True)
class Tiles:
    """Tile sizes for one model shape (all powers of two, dot dims >= 16)."""

    fused: bool  # whole trunk in registers
    block_h: int  # padded hidden width (>= 64)
    block_bits: int  # padded bit count (>= 16, <= 64)
    block_m: int  # rows per program, forward (on the layer-wise path: the head's)
    block_m_bwd: int  # rows per program, backward of the fused trunk
    block_m_head: int  # rows per program of the head's backward kernels (weight gradient, dh)
    block_m_rowwise: int  # rows per program of the layer-wise path's per-layer kernels (~8K elements)
    block_v: int  # vocabulary chunk of the head (>= 64)
    block_hc: int  # hidden-column chunk of the head backward kernels
    block_k_head: int  # reduction chunk of the head when it streams h from memory
    num_warps: int  # warps of the forward and of the layer-wise path's per-layer kernels
    num_warps_bwd: int  # warps of the fused trunk backward (aunn_backward_kernel)
    num_warps_head: int  # warps of the head's backward kernels (weight gradient, dh)
    # registers per thread allowed to the fused forward / backward (Triton's maxnreg; 0: the compiler's
    # choice): fewer registers, more blocks per SM, perhaps spills. A candidate, passed only when set
    # (torch.compile's wrap_triton does not take maxnreg as a launch option in torch 2.11)
    max_registers: int = 0
    max_registers_bwd: int = 0
    # software-pipeline stages of the fused forward (Triton's num_stages; 0: Triton's default, 3 on Hopper).
    # A candidate, passed only when set
    num_stages: int = 0


def choose_tiles(hidden: int, bits: int, vocab: int, precision: str, options: KernelOptions) -> Tiles:
    """Tiles by the compile report for sm_90a and the H100's timings (DESIGN.md, "Tiles"): no spill in bf16
    where one is avoidable; options.tiles replace fields of the answer."""
    block_h = max(MIN_TILE_N, next_power_of_2(hidden))
    fused = hidden <= options.fused_max_hidden
    if fused:
        # fp32 holds more registers (FMA products, or tf32x3's operand parts): half the rows, or the
        # forward spills ~300 B (H = 64) / ~130 B (H = 128) with FMAs for ~5% fewer instructions per index
        # bf16 at H = 64: 64 rows on 4 warps ran 1.4x faster than 128 on 8 on an H100
        block_m = (64 if block_h > 64 or precision == "bf16" else 128) // (2 if precision == "fp32" else 1)
        block_m_bwd = 32 if block_h <= 64 else 16
        if precision == "bf16":
            # twice the rows on 4 warps: at H = 64 64 rows ran 1.19x faster than 32, at H = 128 32 rows 1.35x
            # faster than 16 on 8 warps, despite the ~1.4 KB spill there (H100); "partials" on 64 rows fails
            # to compile under Triton 3.6
            block_m_bwd = 32 if options.weight_grad == "partials" else 2 * block_m_bwd
    else:
        # off the fused path block_m is the forward head's rows, and block_m_bwd has no reader:
        # the per-layer kernels take block_m_rowwise rows, the head's backward block_m_head
        block_m = 64 // (2 if precision == "fp32" else 1)
        block_m_bwd = block_m
    tiles = Tiles(
        fused=fused,
        block_h=block_h,
        block_bits=max(16, next_power_of_2(bits)),
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
        # the fused bf16 forward on 4 warps: on an H100 at H = 128 1.78x faster than on 8
        num_warps=4 if (fused and precision == "bf16") else 8,
        # bf16 on 4 warps (compile report, 32 rows: 20% fewer instructions per index than on 8 and no
        # spill at H = 64, at the same 8 warps per SM); tf32 spills 60 B there and fp32 288 B
        num_warps_bwd=4 if (fused and precision == "bf16") else 8,
        # on 4 warps (the forward's at H = 64 in bf16) these spill up to 570 B at vocab 50,257 and
        # issue twice the instructions at vocab 4 (compile report)
        num_warps_head=8,
    )
    return replace(tiles, **dict(options.tiles)) if options.tiles else tiles


def next_power_of_2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1), as ``triton.next_power_of_2`` (not imported here)."""
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


# The PRECISION constexpr of every kernel (precision.dot): how a product treats its operands.
#   0  fp32 by fp32 FMAs ("ieee")
#   1  tf32: operands rounded to tf32 in registers, tf32 tensor-core products
#   2  bf16: operands cast to bf16, bf16 tensor-core products
#   3  bf16 emulated for the interpreter (whose bf16 tl.dot is garbage): operands rounded, exact fp32 products
#   4  fp32 as three tf32 tensor-core products (Triton's tf32x3; fp32_products "tf32x3")
#   5  tf32x3 emulated for the interpreter
# All accumulate in fp32.
PRECISION_CODES = {"fp32": 0, "tf32": 1, "bf16": 2}
INTERPRETER_PRECISION_CODES = {"fp32": 0, "tf32": 1, "bf16": 3}


def precision_code(precision: str, fp32_products: str, interpreted: bool) -> int:
    """The PRECISION constexpr for precision.dot (see the table above)."""
    if precision == "fp32" and fp32_products == "tf32x3":
        return 5 if interpreted else 4
    return (INTERPRETER_PRECISION_CODES if interpreted else PRECISION_CODES)[precision]


@dataclass(frozen=True)
class KernelConfig:
    """Everything one call's launchers need to know beyond the tensors: chosen by :func:`choose_config`."""

    options: KernelOptions
    tiles: Tiles
    device: DeviceTraits
    precision: str
    precision_code: int  # the kernels' PRECISION constexpr
    fast_sigmoid: bool  # the kernels' FAST_SIGMOID constexpr

    @property
    def partials(self) -> bool:
        """Whether the fused trunk backward forms the weight gradients per program ("partials")."""
        return self.tiles.fused and self.options.weight_grad == "partials"


def choose_config(
    hidden: int, bits: int, vocab: int, precision: str, device: DeviceTraits, options: KernelOptions
) -> KernelConfig:
    """The configuration of a model shape (hidden width, index bits, vocabulary) in a precision on a device."""
    return KernelConfig(
        options=options,
        tiles=choose_tiles(hidden, bits, vocab, precision, options),
        device=device,
        precision=precision,
        precision_code=precision_code(precision, options.fp32_products, device.interpreted),
        # tanh.approx is PTX: not in the interpreter; and fp32 / tf32 promise more digits than its ~2.5e-4
        fast_sigmoid=options.sigmoid == "tanh" and precision == "bf16" and not device.interpreted,
    )


# The head loops over the vocabulary inside each program, so a grid of row blocks alone has as
# many programs as row blocks: with a short prompt and a large vocabulary (conditioning at vocab
# 50,257) one program would stream the whole output weight, 51 MB in fp32 at H = 256, through one
# SM. From vocab_split_min entries on, a grid with fewer than VOCAB_SPLIT_PROGRAMS_PER_SM
# programs per SM cuts the vocabulary into contiguous ranges, one per program; the ranges'
# partial results are combined afterwards (softmax statistics, argmax, dL/dh). Smaller heads
# cost little next to the trunk, which a fused program would recompute for every range.
VOCAB_SPLIT_PROGRAMS_PER_SM = 2


def vocab_splits(row_programs: int, vocab: int, block_v: int, config: KernelConfig) -> tuple[int, int]:
    """(ranges, entries per range) of the head's vocabulary for a grid of row_programs programs;
    the entries per range are a multiple of block_v, and no range is empty."""
    tiles = cdiv(vocab, block_v)
    wanted = 1
    if vocab >= config.options.vocab_split_min:
        wanted = min(tiles, cdiv(VOCAB_SPLIT_PROGRAMS_PER_SM * config.device.sms, max(row_programs, 1)))
    tiles_per_range = cdiv(tiles, wanted)
    return cdiv(tiles, tiles_per_range), tiles_per_range * block_v


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of positive ints, as ``triton.cdiv``."""
    return -(-a // b)
