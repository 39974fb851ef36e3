"""Device functions of the output head and its cross-entropy: a logits tile, the fused loss's
softmax statistics, dloss/dlogits, and dL/dh over a range of the vocabulary. On the loss path the
logits never reach memory: every pass over the head recomputes them tile by tile."""

from __future__ import annotations

import triton
import triton.language as tl

from .precision import dot


@triton.jit
def head_bias(b_ptr, vcols, vmask):
    """The output bias of vocabulary columns vcols [BLOCK_V], fp32; -inf in the columns past the vocabulary
    (vmask false), so that logits built on it need no column mask in softmax, argmax or dlogits."""
    return tl.load(b_ptr + vcols, mask=vmask, other=float("-inf"))


@triton.jit
def head_logits_tile(
    h_ptr, rows, row_mask,  # the head's input and its rows
    w_ptr, b_ptr, vcols, vmask,  # the output weight and bias, and their vocabulary columns
    H,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Logits [BLOCK_M, BLOCK_V] = h[rows] @ w[vcols].T + b[vcols]; -inf past the vocabulary (:func:`head_bias`).

    h fp32/bf16 [N, H] is streamed from memory in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < H
        a = tl.load(h_ptr + rows[:, None] * H + k[None, :], mask=row_mask[:, None] & kmask[None, :], other=0.0).to(
            tl.float32
        )
        wt = tl.load(w_ptr + vcols[None, :] * H + k[:, None], mask=kmask[:, None] & vmask[None, :], other=0.0)
        acc += dot(a, wt, PRECISION)
    return acc + head_bias(b_ptr, vcols, vmask)[None, :]


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
def head_backward_rows(
    h_ptr, target_ptr, grad_ptr, stats_ptr, w_ptr, b_ptr,  # the loss head (head_backward.LossHead)
    rows, row_mask, hcols, hmask,  # the tile of dL/dh
    H, V, v_begin, v_end,  # hidden width, vocabulary; the vocabulary range
    head_grads_ptr,  # output with HEAD_GRADS
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_HC: tl.constexpr,  # tiles
    PRECISION: tl.constexpr, HEAD_GRADS: tl.constexpr,
):  # fmt: skip
    """dL/dh[rows, hcols] [BLOCK_M, BLOCK_HC] of the loss sum_rows grad_row * CE(h @ w.T + b, target),
    the vocabulary entries [v_begin, v_end) only (v_begin a multiple of BLOCK_V).

    h is fp32 or bf16 [N, H].

    Logits are recomputed chunk by chunk from h [N, H] and the saved softmax stats [N, 3]; never stored.
    HEAD_GRADS (hcols covering all of H): also the rows' share of the head's own gradients, stored at
    head_grads_ptr, fp32 [V * H + V]: dlogits.T @ h ([V, H] row-major), then the column sums of dlogits.
    (Stored, not added: with a load-add-store here Triton 3.6 fails to compile the bf16 trunk backward.)
    """
    row_max, log_sum, target_complement = load_softmax_stats(stats_ptr, rows, row_mask)
    target = load_targets(target_ptr, rows, row_mask)
    grad_row = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    if HEAD_GRADS:
        h = tl.load(h_ptr + rows[:, None] * H + hcols[None, :], mask=row_mask[:, None] & hmask[None, :], other=0.0).to(
            tl.float32
        )
    dh = tl.zeros((BLOCK_M, BLOCK_HC), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        vcols = v0 + tl.arange(0, BLOCK_V)
        vmask = vcols < V
        logits = head_logits_tile(
            h_ptr, rows, row_mask, w_ptr, b_ptr, vcols, vmask, H, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION
        )
        d = dlogits(logits, row_max, log_sum, target_complement, target, grad_row, vcols, row_mask)
        w = tl.load(w_ptr + vcols[:, None] * H + hcols[None, :], mask=vmask[:, None] & hmask[None, :], other=0.0)
        dh += dot(d, w, PRECISION)
        if HEAD_GRADS:
            tl.store(
                head_grads_ptr + vcols[:, None] * H + hcols[None, :],
                dot(tl.trans(d), h, PRECISION),
                mask=vmask[:, None] & hmask[None, :],
            )
            tl.store(head_grads_ptr + V * H + vcols, tl.sum(d, axis=0), mask=vmask)
    return dh
