"""The output head's backward: dL/d out_weight, out_bias and dL/dh of the last activation.

Kernels:

* :func:`head_weight_grad_kernel` - dL/d out_weight and out_bias, split over the batch:
  program (v-tile, h-tile, split) recomputes the logits of its rows and accumulates
  dlogits.T @ h in registers; the [splits, V, H] partials are summed once afterwards.
* :func:`head_dh_kernel` - dL/dh of the head (logits recomputed, never stored), per
  (row block, hidden-column chunk, vocabulary range): on the layer-wise path, and on the
  fused one when its row blocks are too few for a large vocabulary (``config.vocab_splits``).
* :func:`dlogits_kernel` - with head_backward "products" (a candidate), dlogits of a chunk of rows whose
  logits a PyTorch product computed, and its bias-gradient partials: the head's backward then runs as
  three products (:func:`head_backward_by_products`) instead of the two kernels above.

Where the head is small, the fused trunk backward sums its gradients itself (mlp_backward); the launchers here
cover the rest: :func:`loss_head_backward` (loss mode) and :func:`logits_head_backward` (``logits()``'s
backward: PyTorch products on the given dL/dlogits).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import launch, new_buffer
from .config import KernelConfig, vocab_splits
from .gemm import batch_reduced_matmul, matmul, reusable_operand
from .head_blocks import dlogits, head_backward_rows, head_bias, head_logits_tile, load_softmax_stats, load_targets
from .precision import dot, store_activation

DLOGITS_BLOCK_M, DLOGITS_BLOCK_V = 32, 128


@triton.jit
def head_weight_grad_kernel(
    h_ptr, target_ptr, grad_ptr, stats_ptr, out_w_ptr, out_b_ptr,  # the loss head (LossHead)
    part_ptr,  # output
    N, H, V,  # rows, hidden width, vocabulary
    rows_per_split,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_HC: tl.constexpr, BLOCK_K: tl.constexpr,  # tiles
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Partial head gradients of rows [split * rows_per_split, (split + 1) * rows_per_split).

    h fp32 or bf16 [N, H] (last activation); grad fp32 [N]; softmax statistics stats fp32 [N, 3]; target int64 [N].
    part fp32 [splits, V * H + V]: per split, dw = dlogits.T @ h over its rows ([V, H], row-major),
    then db = the column sums of dlogits ([V]), so that one reduction over the splits gives both.
    """
    pid_v = tl.program_id(0)
    pid_h = tl.program_id(1)
    split = tl.program_id(2)
    vcols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = vcols < V
    hcols = pid_h * BLOCK_HC + tl.arange(0, BLOCK_HC)
    hmask = hcols < H
    dw = tl.zeros((BLOCK_V, BLOCK_HC), dtype=tl.float32)
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for r0 in range(0, rows_per_split, BLOCK_M):
        rows = split.to(tl.int64) * rows_per_split + r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < N
        logits = head_logits_tile(
            h_ptr, rows, row_mask, out_w_ptr, out_b_ptr, vcols, vmask, H, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION
        )
        row_max, log_sum, target_complement = load_softmax_stats(stats_ptr, rows, row_mask)
        d = dlogits(
            logits,
            row_max,
            log_sum,
            target_complement,
            load_targets(target_ptr, rows, row_mask),
            tl.load(grad_ptr + rows, mask=row_mask, other=0.0),
            vcols,
            row_mask,
        )
        h = tl.load(h_ptr + rows[:, None] * H + hcols[None, :], mask=row_mask[:, None] & hmask[None, :], other=0.0).to(
            tl.float32
        )
        dw += dot(tl.trans(d), h, PRECISION)
        db += tl.sum(d, axis=0)
    part = part_ptr + split.to(tl.int64) * (V * H + V)
    tl.store(part + vcols[:, None] * H + hcols[None, :], dw, mask=vmask[:, None] & hmask[None, :])
    if pid_h == 0:  # every hidden-column program computed the same bias gradient; one writes it
        tl.store(part + V * H + vcols, db, mask=vmask)


@triton.jit
def head_dh_kernel(
    h_ptr, target_ptr, grad_ptr, stats_ptr, out_w_ptr, out_b_ptr,  # the loss head (LossHead)
    dh_ptr,  # output
    N, H, V,  # rows, hidden width, vocabulary
    v_per_range,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_HC: tl.constexpr, BLOCK_K: tl.constexpr,  # tiles
    PRECISION: tl.constexpr,
):  # fmt: skip
    """dL/dh of sum_rows grad * CE over the vocabulary range r = program axis 2, entries
    [r * v_per_range, (r + 1) * v_per_range): fp32 [ranges, N, H], to be summed over the ranges;
    a tile of BLOCK_M rows and BLOCK_HC columns per program."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    hcols = tl.program_id(1) * BLOCK_HC + tl.arange(0, BLOCK_HC)
    hmask = hcols < H
    v_range = tl.program_id(2)
    v_begin = v_range * v_per_range
    dh = head_backward_rows(
        h_ptr=h_ptr,
        target_ptr=target_ptr,
        grad_ptr=grad_ptr,
        stats_ptr=stats_ptr,
        w_ptr=out_w_ptr,
        b_ptr=out_b_ptr,
        rows=rows,
        row_mask=row_mask,
        hcols=hcols,
        hmask=hmask,
        H=H,
        V=V,
        v_begin=v_begin,
        v_end=tl.minimum(V, v_begin + v_per_range),
        head_grads_ptr=dh_ptr,  # not written (HEAD_GRADS False)
        BLOCK_M=BLOCK_M,
        BLOCK_V=BLOCK_V,
        BLOCK_K=BLOCK_K,
        BLOCK_HC=BLOCK_HC,
        PRECISION=PRECISION,
        HEAD_GRADS=False,
    )
    out = dh_ptr + v_range.to(tl.int64) * N * H + rows[:, None] * H + hcols[None, :]
    tl.store(out, dh, mask=row_mask[:, None] & hmask[None, :])


@triton.jit
def dlogits_kernel(
    logits_ptr, b_ptr, target_ptr, grad_ptr, stats_ptr,  # the logits less the bias; the loss head's inputs
    d_ptr, db_ptr,  # outputs
    N, V,  # rows, vocabulary
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,  # tiles
    PRECISION: tl.constexpr,
):  # fmt: skip
    """d(sum_rows grad * CE)/d logits of a [BLOCK_M, BLOCK_V] tile, from the logits less the bias, fp32 [N, V]
    (a PyTorch product), the forward's softmax stats fp32 [N, 3], targets int64 [N] and grad fp32 [N]: d [N, V]
    (fp32, or bf16 in the bf16 mode: only products read it), and the column sums of the fp32 tile, the bias
    gradient's share of row block p (program axis 0), at db_ptr + p * V."""
    block = tl.program_id(0).to(tl.int64)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    vcols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = vcols < V
    offsets = rows[:, None] * V + vcols[None, :]
    mask = row_mask[:, None] & vmask[None, :]
    logits = tl.load(logits_ptr + offsets, mask=mask, other=0.0) + head_bias(b_ptr, vcols, vmask)[None, :]
    row_max, log_sum, target_complement = load_softmax_stats(stats_ptr, rows, row_mask)
    d = dlogits(
        logits,
        row_max,
        log_sum,
        target_complement,
        load_targets(target_ptr, rows, row_mask),
        tl.load(grad_ptr + rows, mask=row_mask, other=0.0),
        vcols,
        row_mask,
    )
    store_activation(d_ptr + offsets, d, mask, PRECISION)
    tl.store(db_ptr + block * V + vcols, tl.sum(d, axis=0), mask=vmask)


class LossHead(NamedTuple):
    """What the backward of the loss head sum_rows grad * CE(h_last @ out_weight.T + out_bias, targets) reads:
    the last activation h_last [N, H] (fp32, or bf16 in the bf16 mode), targets int64 [N], the per-row upstream
    gradient grad fp32 [N], the forward's softmax statistics stats fp32 [N, 3]
    (:func:`head_blocks.cross_entropy_stats`), and out_weight [V, H] and out_bias fp32 [V] as the kernels read
    them (fp32, or a bf16 weight copy: weights.py)."""

    h_last: torch.Tensor
    targets: torch.Tensor
    grad: torch.Tensor
    stats: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor


def head_kernel_arguments(head: LossHead, config: KernelConfig) -> dict[str, object]:
    """The arguments that :func:`head_weight_grad_kernel` and :func:`head_dh_kernel` share: the head's tensors,
    sizes and tiles, the precision and the warps."""
    (n, hidden), vocab, t = head.h_last.shape, head.out_weight.shape[0], config.tiles
    return {
        "h_ptr": head.h_last,
        "target_ptr": head.targets,
        "grad_ptr": head.grad,
        "stats_ptr": head.stats,
        "out_w_ptr": head.out_weight,
        "out_b_ptr": head.out_bias,
        "N": n,
        "H": hidden,
        "V": vocab,
        "BLOCK_M": t.block_m_head,
        "BLOCK_V": t.block_v,
        "BLOCK_HC": t.block_hc,
        "BLOCK_K": t.block_k_head,
        "PRECISION": config.precision_code,
        "num_warps": t.num_warps_head,
    }


def loss_head_backward(
    head: LossHead, head_sums: torch.Tensor, want_dh: bool, want_weight_grads: bool, config: KernelConfig
) -> torch.Tensor | None:
    """The loss head's backward. With want_weight_grads, the head's gradients are written to head_sums fp32
    [V * H + V] (out_weight's [V, H] row-major, then out_bias's); returns dL/dh_last fp32 [N, H] with want_dh,
    else None (the fused trunk backward then recomputes it)."""
    if want_dh and config.options.head_backward == "products":
        return head_backward_by_products(head, head_sums, config)
    if want_weight_grads:
        launch_head_weight_grad(head, head_sums, config)
    if want_dh:
        return launch_head_dh(head, config)
    return None


def launch_head_weight_grad(head: LossHead, head_sums: torch.Tensor, config: KernelConfig) -> None:
    """:func:`head_weight_grad_kernel` over the batch, split into enough row ranges to fill the SMs; the
    splits' partials summed into head_sums fp32 [V * H + V]."""
    (n, hidden), vocab, t = head.h_last.shape, head.out_weight.shape[0], config.tiles
    grid_v, grid_h = triton.cdiv(vocab, t.block_v), triton.cdiv(hidden, t.block_hc)
    head_blocks = triton.cdiv(n, t.block_m_head)
    splits = max(1, min(head_blocks, triton.cdiv(4 * config.device.sms, grid_v * grid_h)))
    rows_per_split = triton.cdiv(head_blocks, splits) * t.block_m_head
    splits = triton.cdiv(n, rows_per_split)
    # one split (a large head has tiles enough): its partials are the gradients
    head_part = (
        head_sums[None]
        if splits == 1
        else new_buffer((splits, head_sums.numel()), torch.float32, head_sums.device, config.options.poison_outputs)
    )
    launch(
        head_weight_grad_kernel,
        (grid_v, grid_h, splits),
        part_ptr=head_part,
        rows_per_split=rows_per_split,
        **head_kernel_arguments(head, config),
    )
    if splits > 1:
        torch.sum(head_part, 0, out=head_sums)


def launch_head_dh(head: LossHead, config: KernelConfig) -> torch.Tensor:
    """dL/dh_last fp32 [N, H] by :func:`head_dh_kernel`, its vocabulary ranges summed."""
    (n, hidden), vocab, t = head.h_last.shape, head.out_weight.shape[0], config.tiles
    head_blocks, grid_h = triton.cdiv(n, t.block_m_head), triton.cdiv(hidden, t.block_hc)
    ranges, v_per_range = vocab_splits(head_blocks * grid_h, vocab, t.block_v, config)
    dh = new_buffer((ranges, n, hidden), torch.float32, head.h_last.device, config.options.poison_outputs)
    launch(
        head_dh_kernel,
        (head_blocks, grid_h, ranges),
        dh_ptr=dh,
        v_per_range=v_per_range,
        **head_kernel_arguments(head, config),
    )
    return dh[0] if ranges == 1 else dh.sum(0)


def head_backward_by_products(head: LossHead, head_sums: torch.Tensor, config: KernelConfig) -> torch.Tensor:
    """dL/dh_last fp32 [N, H] of the loss head, and the head's own gradients written to head_sums fp32
    [V * H + V] (out_weight's [V, H] row-major, then out_bias's), a chunk of rows at a time
    (head_gemm_chunk_elements logits): logits = h @ W.T by :func:`matmul`, dlogits by :func:`dlogits_kernel`,
    then dL/dh = dlogits @ W and dL/dW += dlogits.T @ h by :func:`matmul`."""
    (n, hidden), vocab = head.h_last.shape, head.out_weight.shape[0]
    precision, poison, device = config.precision, config.options.poison_outputs, head.h_last.device
    d_weight, d_bias = head_sums[: vocab * hidden].view(vocab, hidden), head_sums[vocab * hidden :]
    d_weight.zero_()
    d_bias.zero_()
    weight = reusable_operand(head.out_weight, precision)
    d_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    chunk = max(1, config.options.head_gemm_chunk_elements // (vocab * DLOGITS_BLOCK_M)) * DLOGITS_BLOCK_M
    dh = new_buffer((n, hidden), torch.float32, device, poison)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        h = head.h_last[start:end]
        row_blocks = triton.cdiv(end - start, DLOGITS_BLOCK_M)
        d = new_buffer((end - start, vocab), d_dtype, device, poison)
        bias_part = new_buffer((row_blocks, vocab), torch.float32, device, poison)
        launch(
            dlogits_kernel,
            (row_blocks, triton.cdiv(vocab, DLOGITS_BLOCK_V)),
            logits_ptr=matmul(h, weight.t(), precision),
            b_ptr=head.out_bias,
            target_ptr=head.targets[start:end],
            grad_ptr=head.grad[start:end],
            stats_ptr=head.stats[start:end],
            d_ptr=d,
            db_ptr=bias_part,
            N=end - start,
            V=vocab,
            BLOCK_M=DLOGITS_BLOCK_M,
            BLOCK_V=DLOGITS_BLOCK_V,
            PRECISION=config.precision_code,
            num_warps=4,
        )
        dh[start:end] = matmul(d, weight, precision)
        d_weight += matmul(d.t(), h, precision)
        d_bias += bias_part.sum(0)
    return dh


def logits_head_backward(
    grad: torch.Tensor, h_last: torch.Tensor, out_weight: torch.Tensor, head_sums: torch.Tensor, config: KernelConfig
) -> torch.Tensor:
    """``logits()``'s head backward from dL/dlogits grad fp32 [N, V]: the head's gradients written to head_sums
    fp32 [V * H + V]; returns dL/dh_last = grad @ W fp32 [N, H]. PyTorch products."""
    vocab, hidden = out_weight.shape
    head_sums[: vocab * hidden].view(vocab, hidden).copy_(
        batch_reduced_matmul(grad, h_last, config.precision, config.options.split_k_min_rows)
    )
    torch.sum(grad, 0, out=head_sums[vocab * hidden :])
    return matmul(grad, out_weight, config.precision)
