"""The weights as the kernels read them: fp32 as given, or bf16 copies in the bf16 mode (DESIGN.md, "bf16
weight copies"): the output weight of a large head (:func:`head_weight`), and for large batches every weight
of the fused kernels (:func:`fused_weights`), made by one launch (:func:`bf16_copies`)."""

from __future__ import annotations

from itertools import accumulate

import torch
import triton
import triton.language as tl

from .common import launch
from .config import KernelConfig, KernelOptions, precision_code
from .gemm import reusable_operand
from .precision import store_activation


def head_weight(out_weight: torch.Tensor, precision: str, rows: int, options: KernelOptions) -> torch.Tensor:
    """The output weight [V, H] as the head kernels read it for a batch of rows: fp32, or in the bf16 mode a
    bf16 copy from head_copy_min_elements elements and head_copy_min_rows rows on. (A copy halves the bytes,
    and at vocab 50,257 x H 256 it stays in the H100's L2; a smaller head stays in cache as fp32, and a prompt's
    row block or two reads the weight about once, less than the copy's own read and write.)"""
    large = out_weight.numel() >= options.head_copy_min_elements and rows >= options.head_copy_min_rows
    return reusable_operand(out_weight, precision) if large else out_weight


@triton.jit
def bf16_copy_kernel(a_ptr, b_ptr, c_ptr, out_ptr, a_end, b_end, c_end, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """out bf16 [c_end] = a, b, c (fp32, flattened) one after another: a fills [0, a_end), b [a_end, b_end),
    c [b_end, c_end); rounded to nearest (:func:`store_activation`)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    from_a, from_b = i < a_end, (i >= a_end) & (i < b_end)
    from_c = (i >= b_end) & (i < c_end)
    x = tl.where(
        from_a,
        tl.load(a_ptr + i, mask=from_a, other=0.0),
        tl.where(
            from_b,
            tl.load(b_ptr + (i - a_end), mask=from_b, other=0.0),
            tl.load(c_ptr + (i - b_end), mask=from_c, other=0.0),
        ),
    )
    store_activation(out_ptr + i, x, i < c_end, PRECISION)


def bf16_copies(sources: list[torch.Tensor], interpreted: bool) -> list[torch.Tensor]:
    """bf16 copies of two or three contiguous fp32 tensors, views of one buffer made by one launch."""
    sizes = [t.numel() for t in sources]
    ends = list(accumulate(sizes))
    copy = torch.empty(ends[-1], dtype=torch.bfloat16, device=sources[0].device)
    # with two sources the third segment is the second again, over an empty range
    a, b, c = (sources + sources[-1:])[:3]
    a_end, b_end, c_end = (ends + ends[-1:])[:3]
    block = 1024
    launch(
        bf16_copy_kernel,
        (triton.cdiv(c_end, block),),
        a_ptr=a,
        b_ptr=b,
        c_ptr=c,
        out_ptr=copy,
        a_end=a_end,
        b_end=b_end,
        c_end=c_end,
        BLOCK=block,
        PRECISION=precision_code("bf16", "ieee", interpreted),
        num_warps=4,
    )
    return [part.view(t.shape) for part, t in zip(copy.split(sizes), sources)]


def fused_weights(
    in_weight: torch.Tensor,
    hidden_weight: torch.Tensor,
    out_weight: torch.Tensor,
    rows: int,
    config: KernelConfig,
    head: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(in, hidden, out) weights as the fused kernels read them for a batch of rows: from
    weight_copy_min_rows rows on in the bf16 mode, bf16 copies of the trunk's (and, with head, of a
    small output weight; a large one is :func:`head_weight`'s), made by one launch; else as given."""
    options = config.options
    out = head_weight(out_weight, config.precision, rows, options)
    if config.precision != "bf16" or rows < options.weight_copy_min_rows:
        return in_weight, hidden_weight, out
    copy_head = head and out.dtype == torch.float32
    copies = bf16_copies([in_weight, hidden_weight] + ([out_weight] if copy_head else []), config.device.interpreted)
    return copies[0], copies[1], copies[2] if copy_head else out
