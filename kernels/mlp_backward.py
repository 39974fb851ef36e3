"""AUNN backward: gradients of every parameter from the activations the forward saved.

Kernels:

* :func:`aunn_backward_kernel` (hidden <= FUSED_MAX_HIDDEN) - each program takes row blocks
  of BLOCK_M rows (one block per program, or several on a persistent grid): recomputes the
  head's logits chunk by chunk from the last activation and the saved logsumexp (or loads
  a given dL/dh), then walks the layers in reverse entirely in registers, recomputing each
  pre-activation z = a @ W.T + b from the saved layer input, applying the SiLU/RMSNorm
  backward and the residual bookkeeping, and propagating dL/dh = dz @ W. It writes
  per-program partial gain and bias gradients ([programs, L-1, H]) and, per WEIGHT_GRAD,
  either dz of every layer ([L-1, N, H]) or per-program partial weight gradients.
* :func:`head_weight_grad_kernel` - dL/d out_weight and out_bias, split over the batch:
  program (v-tile, h-tile, split) recomputes the logits of its rows and accumulates
  dlogits.T @ h in registers; the [splits, V, H] partials are summed once afterwards.
* :func:`head_dh_kernel` - dL/dh of the head (logits recomputed, never stored), per
  (row block, hidden-column chunk, vocabulary range): on the layer-wise path, and on the
  fused one when its row blocks are too few for a large vocabulary (``common.vocab_splits``).
* :func:`dlogits_kernel` - with HEAD_GEMM_MIN_VOCAB (a candidate), dlogits of a chunk of rows
  whose logits a PyTorch product computed, and its bias-gradient partials: the head's backward
  then runs as three products (:func:`head_backward_gemms`) instead of the two kernels above.
* :func:`layer_backward_kernel` - the layer-wise path for wide models: per layer the residual
  bookkeeping, the SiLU/RMSNorm backward from the stored pre-activations, and per-program
  gain and bias gradients.

PyTorch (cuBLAS, :mod:`gemm`) does the rest: the sums of the per-program partials; with
WEIGHT_GRAD "torch" the trunk's weight-gradient GEMMs (dW = dz.T @ a, one batched product
for all hidden layers); on the layer-wise path also dL/dh = dz @ W between the layers.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import checked_switch, choose_tiles, compile_options, fast_sigmoid, launch, num_sms, vocab_splits
from .gemm import batch_reduced_matmul, matmul, reusable_operand
from .head_blocks import dlogits, head_backward_rows, head_bias, head_logits_tile, load_softmax_stats, load_targets
from .mlp_forward import MODE_LOGITS, MODE_LOSS, fused_weights, head_weight, index_bits_matrix, new_buffer
from .precision import dot, precision_code, store_activation
from .trunk_blocks import index_bits, silu_rmsnorm_backward

# How the fused trunk's weight and bias gradients are computed (a benchmarking switch, read
# at call time; the layer-wise path always uses "torch"):
# "torch"    - the kernel writes dz [L-1, N, H] and the index bits; PyTorch matmuls dz.T @ acts;
# "partials" - a persistent grid accumulates dz.T @ a per program; dz never reaches memory.
# Both: the kernel sums bias (and gain) gradients per program; the partials are summed once.
WEIGHT_GRAD_CHOICES = ("torch", "partials")
WEIGHT_GRAD = os.environ.get("AUNN_FAST_WEIGHT_GRAD", "torch")
# "partials" grid on CUDA: this many programs per SM (capped by the number of row blocks).
PARTIAL_PROGRAMS_PER_SM = 2
# The layer-wise backward's persistent grid on CUDA: programs per SM (a guess to be measured), so
# that its gain and bias partials are [2 x SMs, L-1, H] whatever the batch.
ROWWISE_PROGRAMS_PER_SM = 2
# Small heads' gradients summed by the fused trunk backward, which recomputes their dlogits anyway
# (see `backward`): on the 1M-row step on the H100 head_weight_grad_kernel took 0.31 ms of 5.0, and at
# 8,192 rows it and its reduction are two launches of the graphed step. The trunk kernel pays a product
# and a store per row block (SASS, seed model, bf16 with tanh: 227 -> 255 registers, still 2 blocks per
# SM; ~8% more instructions per block). Measured on the H100's second lease: a tie at 1M rows (forward +
# backward 3.445 ms against 3.472 with the separate kernel); kept for the graphed small step's two
# launches. False: the separate kernel always (a kernel_variants candidate).
HEAD_GRADS_IN_TRUNK = True
# How the fused trunk backward reads a hidden layer's weight for its two products (on the H100 True ran the
# 1M-row forward + backward 10% faster: 3.445 ms against 3.824). True: once as stored, W [out, in]; Triton's
# pipeliner then streams it into shared memory a layer ahead (cp.async) and both products read it there, one
# transposed (SASS, seed model, bf16, tanh: 8 barriers fewer per layer, 26 -> 18 in the loop, 682 -> 685
# instructions, 12 B of spill). False: loaded as W.T into registers at the top of each layer, L1-cached but
# not prefetched, then rewritten through shared memory in four rounds of two barriers for the products'
# operand layouts. The "partials" form always takes the latter: with the former Triton 3.6 fails to compile
# it in bf16 (PassManager::run failed, compile_check).
LOAD_WEIGHT_ONCE = True
# The head's backward where head_dh_kernel would run (the layer-wise path; the fused one when its row blocks
# split the vocabulary), from vocabularies this large on, through PyTorch products on dlogits materialised a
# chunk of rows at a time (:func:`head_backward_gemms`). A kernel_variants candidate, off until a GPU has
# timed it: head_dh_kernel and head_weight_grad_kernel recompute the logits in each of their hidden-column
# programs, so the H100's bpe train step (vocab 50,257, H = 256, 16K rows: 23.2 ms) multiplied ~2.9 TFLOP
# of head products where 1.7 would do (0.42 each: the forward's logits, the backward's logits, dL/dh and
# dL/dW); here cuBLAS runs the backward's three, for writing and reading dlogits (2 bytes an entry in
# bf16) and one [V, H] accumulation per chunk.
HEAD_GEMM_MIN_VOCAB = 1 << 62
# fp32 logits per chunk: 2^27 elements, 512 MB (2,670 rows at vocab 50,257; with dlogits in bf16, 768 MB in all)
HEAD_GEMM_CHUNK_ELEMENTS = 1 << 27
DLOGITS_BLOCK_M, DLOGITS_BLOCK_V = 32, 128


def weight_grad_method() -> str:
    """WEIGHT_GRAD, checked."""
    return checked_switch(WEIGHT_GRAD, WEIGHT_GRAD_CHOICES, "trunk weight-gradient method", "mlp_backward.WEIGHT_GRAD")


@triton.jit
def accumulate(ptrs, value, mask, first):
    """*ptrs = value on a program's first row block, else *ptrs += value (each program owns its slice)."""
    if first:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value + tl.load(ptrs, mask=mask, other=0.0), mask=mask)


@triton.jit
def aunn_backward_kernel(
    idx_ptr, target_ptr, grad_ptr, lse_ptr, act_ptr, dz_ptr, x_ptr, part_ptr, dw_in_ptr, dw_ptr,
    in_w_ptr, in_b_ptr, in_g_ptr, hid_w_ptr, hid_b_ptr, hid_g_ptr, out_w_ptr, out_b_ptr,
    N, H: tl.constexpr, V, n_hidden, residual_every, eps, act_stride, head_in_offset, partial_stride,
    BITS: tl.constexpr, BLOCK_BITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr, HEAD_FROM_LSE: tl.constexpr, HEAD_GRADS: tl.constexpr, WEIGHT_GRADS: tl.constexpr,
    WEIGHT_ONCE: tl.constexpr, PRECISION: tl.constexpr, FAST_SIGMOID: tl.constexpr,
):
    """Trunk backward, all layers in registers; program p takes row blocks p, p + P, p + 2P, ...
    (P = number of programs).

    HEAD_FROM_LSE: grad is the per-row upstream gradient of the row losses fp32 [N]
    (targets int64 [N] and softmax stats lse fp32 [N, 3] from the forward); else grad is dL/dh_last fp32 [N, H].
    act fp32 or bf16 [L-1, N, H] from the forward; weights fp32 or bf16 copies (mlp_forward.fused_weights).
    Outputs, each program summing over its row blocks:
    part fp32 [P, partial_stride], program p's row: the bias gradients [L-1, H], the gain gradients
    [L-1, H] and, with HEAD_GRADS (HEAD_FROM_LSE, one row block per program), the head's (out_weight
    [V, H], out_bias [V]);
    with WEIGHT_GRADS also dw_in fp32 [P, H, BITS] (input layer) and dw fp32 [P, L-2, H, H] (hidden
    layers), and dz is not stored; without it dz [L-1, N, H] and the index bits x [N, BITS] (fp32, or
    bf16 in bf16 mode; the weight gradients are then PyTorch's).
    WEIGHT_ONCE: each hidden layer's weight is loaded as stored, W [out, in], and both products read that
    one tile (z = a @ W.T, dL/dh = dz @ W); else as W.T (see LOAD_WEIGHT_ONCE).
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    hcols = tl.arange(0, BLOCK_H)
    hmask = hcols < H
    hh_mask = hmask[:, None] & hmask[None, :]
    k = tl.arange(0, BLOCK_BITS)
    pid64 = pid.to(tl.int64)
    part_row = part_ptr + pid64 * partial_stride
    db_row = part_row + hcols
    dgain_row = db_row + (n_hidden + 1) * H
    head_grads = part_row + 2 * (n_hidden + 1) * H
    dw_tile = dw_ptr + pid64 * n_hidden * H * H + hcols[:, None] * H + hcols[None, :]
    dw_in_tile = dw_in_ptr + pid64 * H * BITS + hcols[None, :] * BITS + k[:, None]
    dw_in_mask = (k[:, None] < BITS) & hmask[None, :]

    for block in range(pid, tl.cdiv(N, BLOCK_M), programs):
        first = block == pid
        if WEIGHT_GRADS:
            # the partials stored for the previous block, by whichever threads held them,
            # must be visible to the threads that load them now
            tl.debug_barrier()
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < N
        act_row = rows[:, None] * H + hcols[None, :]
        act_mask = row_mask[:, None] & hmask[None, :]

        if HEAD_FROM_LSE:
            gh = head_backward_rows(act_ptr + head_in_offset, target_ptr, grad_ptr, lse_ptr, out_w_ptr, out_b_ptr,
                                    rows, row_mask, hcols, hmask, H, V, 0, V, head_grads,
                                    BLOCK_M, BLOCK_V, BLOCK_H, BLOCK_H, PRECISION, HEAD_GRADS)
        else:
            gh = tl.load(grad_ptr + act_row, mask=act_mask, other=0.0)

        # gh: dL/dh_l along the layer chain; g_res: dL/d(res) accumulated from later residual adds.
        # Rows past N have gh = 0, hence dz = 0: they add nothing to the weight gradients.
        g_res = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        # act[layer] and dz[layer + 1], stepped down one layer at a time
        act_in_ptr = act_ptr + head_in_offset
        dz_out_ptr = dz_ptr + head_in_offset
        for i in range(n_hidden):
            layer = n_hidden - 1 - i  # 0-based hidden layer; act[layer] is its input, act[layer + 1] its output
            if (layer + 1) % residual_every == 0:
                # h = y + res and res = h: both incoming gradients reach y and the earlier res
                gh = gh + g_res
                g_res = gh
            act_in_ptr -= act_stride
            a = tl.load(act_in_ptr + act_row, mask=act_mask, other=0.0).to(tl.float32)
            if WEIGHT_ONCE:
                w = tl.load(hid_w_ptr + layer * H * H + hcols[:, None] * H + hcols[None, :], mask=hh_mask, other=0.0)
                w_t = tl.trans(w)
            else:
                w_t = tl.load(hid_w_ptr + layer * H * H + hcols[None, :] * H + hcols[:, None], mask=hh_mask,
                              other=0.0)
                w = tl.trans(w_t)
            z = dot(a, w_t, PRECISION) + tl.load(hid_b_ptr + layer * H + hcols, mask=hmask, other=0.0)[None, :]
            dz, dgain = silu_rmsnorm_backward(gh, z, tl.load(hid_g_ptr + layer * H + hcols, mask=hmask, other=0.0),
                                              H, eps, FAST_SIGMOID)
            if WEIGHT_GRADS:
                accumulate(dw_tile + layer * H * H, dot(tl.trans(dz), a, PRECISION), hh_mask, first)
            else:
                store_activation(dz_out_ptr + act_row, dz, act_mask, PRECISION)
                dz_out_ptr -= act_stride
            accumulate(db_row + (layer + 1) * H, tl.sum(dz, axis=0), hmask, first)
            accumulate(dgain_row + (layer + 1) * H, dgain, hmask, first)
            gh = dot(dz, w, PRECISION)

        # input layer; res started as its output
        gh = gh + g_res
        idx = tl.load(idx_ptr + rows, mask=row_mask, other=0)
        x = index_bits(idx, k, BITS)
        w_in_t = tl.load(in_w_ptr + hcols[None, :] * BITS + k[:, None], mask=dw_in_mask, other=0.0)
        z = dot(x, w_in_t, PRECISION) + tl.load(in_b_ptr + hcols, mask=hmask, other=0.0)[None, :]
        dz, dgain = silu_rmsnorm_backward(gh, z, tl.load(in_g_ptr + hcols, mask=hmask, other=0.0), H, eps,
                                          FAST_SIGMOID)
        if WEIGHT_GRADS:
            # [BLOCK_BITS, BLOCK_H] = dW_in.T: the 64-wide hidden side is the dot's output width
            accumulate(dw_in_tile, dot(tl.trans(x), dz, PRECISION), dw_in_mask, first)
        else:
            store_activation(dz_ptr + act_row, dz, act_mask, PRECISION)
            store_activation(x_ptr + rows[:, None] * BITS + k[None, :], x, row_mask[:, None] & (k[None, :] < BITS),
                             PRECISION)
        accumulate(db_row, tl.sum(dz, axis=0), hmask, first)
        accumulate(dgain_row, dgain, hmask, first)


@triton.jit
def head_weight_grad_kernel(
    h_ptr, target_ptr, grad_ptr, lse_ptr, out_w_ptr, out_b_ptr, part_ptr,
    N, H, V, rows_per_split,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_HC: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial head gradients of rows [split * rows_per_split, (split + 1) * rows_per_split).

    h fp32 or bf16 [N, H] (last activation); grad fp32 [N]; softmax stats lse fp32 [N, 3]; target int64 [N].
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
        logits = head_logits_tile(h_ptr, rows, row_mask, out_w_ptr, out_b_ptr, vcols, vmask, H,
                                  BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)
        row_max, log_sum, target_complement = load_softmax_stats(lse_ptr, rows, row_mask)
        d = dlogits(logits, row_max, log_sum, target_complement, load_targets(target_ptr, rows, row_mask),
                    tl.load(grad_ptr + rows, mask=row_mask, other=0.0), vcols, row_mask)
        h = tl.load(h_ptr + rows[:, None] * H + hcols[None, :], mask=row_mask[:, None] & hmask[None, :],
                    other=0.0).to(tl.float32)
        dw += dot(tl.trans(d), h, PRECISION)
        db += tl.sum(d, axis=0)
    part = part_ptr + split.to(tl.int64) * (V * H + V)
    tl.store(part + vcols[:, None] * H + hcols[None, :], dw, mask=vmask[:, None] & hmask[None, :])
    if pid_h == 0:  # every hidden-column program computed the same bias gradient; one writes it
        tl.store(part + V * H + vcols, db, mask=vmask)


@triton.jit
def head_dh_kernel(
    h_ptr, target_ptr, grad_ptr, lse_ptr, out_w_ptr, out_b_ptr, dh_ptr,
    N, H, V, v_per_range,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_HC: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dL/dh of sum_rows grad * CE over the vocabulary range r = program axis 2, entries
    [r * v_per_range, (r + 1) * v_per_range): fp32 [ranges, N, H], to be summed over the ranges;
    a tile of BLOCK_M rows and BLOCK_HC columns per program."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    hcols = tl.program_id(1) * BLOCK_HC + tl.arange(0, BLOCK_HC)
    hmask = hcols < H
    v_range = tl.program_id(2)
    v_begin = v_range * v_per_range
    dh = head_backward_rows(h_ptr, target_ptr, grad_ptr, lse_ptr, out_w_ptr, out_b_ptr, rows, row_mask,
                            hcols, hmask, H, V, v_begin, tl.minimum(V, v_begin + v_per_range), dh_ptr,
                            BLOCK_M, BLOCK_V, BLOCK_K, BLOCK_HC, PRECISION, False)
    out = dh_ptr + v_range.to(tl.int64) * N * H + rows[:, None] * H + hcols[None, :]
    tl.store(out, dh, mask=row_mask[:, None] & hmask[None, :])


@triton.jit
def dlogits_kernel(logits_ptr, b_ptr, target_ptr, grad_ptr, stats_ptr, d_ptr, db_ptr, N, V,
                   BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr):
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
    d = dlogits(logits, row_max, log_sum, target_complement, load_targets(target_ptr, rows, row_mask),
                tl.load(grad_ptr + rows, mask=row_mask, other=0.0), vcols, row_mask)
    store_activation(d_ptr + offsets, d, mask, PRECISION)
    tl.store(db_ptr + block * V + vcols, tl.sum(d, axis=0), mask=vmask)


@triton.jit
def layer_backward_kernel(
    dy_ptr, g_res_ptr, z_ptr, g_ptr, dz_ptr, dgain_ptr, dbias_ptr, N, H, eps, partial_stride,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, ADD_RES: tl.constexpr, STORE_RES: tl.constexpr,
    PRECISION: tl.constexpr, FAST_SIGMOID: tl.constexpr,
):
    """One layer's backward after the GEMM that gave dL/dh; program p takes the row blocks (BLOCK_M
    whole rows) p, p + P, p + 2P, ... (P = number of programs).

    dy fp32 [N, H]: dL/dh from the layer above; with ADD_RES the residual stream's gradient
    g_res fp32 [N, H] is added, and with STORE_RES the sum is written back to g_res (a layer
    ending in a residual add passes its gradient on both ways). Then the SiLU/RMSNorm backward
    from the pre-activation z fp32 [N, H]: dz [N, H] (fp32, or bf16 in the bf16 mode: only GEMMs
    read it), and the program's gain and bias gradients summed over its rows, [BLOCK_H] at
    dgain_ptr / dbias_ptr + program * partial_stride.
    """
    pid = tl.program_id(0)
    hcols = tl.arange(0, BLOCK_H)
    hmask = hcols < H
    gain = tl.load(g_ptr + hcols, mask=hmask, other=0.0)
    dgain = tl.zeros((BLOCK_H,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for block in range(pid, tl.cdiv(N, BLOCK_M), tl.num_programs(0)):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        offsets = rows[:, None] * H + hcols[None, :]
        mask = (rows < N)[:, None] & hmask[None, :]
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0)
        if ADD_RES:
            dy += tl.load(g_res_ptr + offsets, mask=mask, other=0.0)
        if STORE_RES:
            tl.store(g_res_ptr + offsets, dy, mask=mask)
        dz, block_dgain = silu_rmsnorm_backward(dy, tl.load(z_ptr + offsets, mask=mask, other=0.0), gain, H, eps,
                                                FAST_SIGMOID)
        store_activation(dz_ptr + offsets, dz, mask, PRECISION)
        dgain += block_dgain
        dbias += tl.sum(dz, axis=0)
    tl.store(dgain_ptr + pid.to(tl.int64) * partial_stride + hcols, dgain, mask=hmask)
    tl.store(dbias_ptr + pid.to(tl.int64) * partial_stride + hcols, dbias, mask=hmask)


def _persistent_programs(device: torch.device, row_blocks: int, per_sm: int) -> int:
    """Programs of a persistent grid over row_blocks: per_sm per SM. Under the interpreter 2,
    so that the tests' programs each sum several row blocks."""
    if device.type == "cuda":
        return min(row_blocks, per_sm * num_sms(device))
    return min(row_blocks, 2)


def head_backward_gemms(h_last: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor, lse: torch.Tensor,
                        out_weight: torch.Tensor, out_bias: torch.Tensor, precision: str,
                        head_sums: torch.Tensor) -> torch.Tensor:
    """dL/dh_last fp32 [N, H] of sum_rows grad * CE (targets, the forward's stats lse), and the head's own
    gradients written to head_sums fp32 [V * H + V] (out_weight's [V, H] row-major, then out_bias's), a chunk
    of rows at a time (HEAD_GEMM_CHUNK_ELEMENTS): logits = h @ W.T by :func:`matmul`, dlogits by
    :func:`dlogits_kernel`, then dL/dh = dlogits @ W and dL/dW += dlogits.T @ h by :func:`matmul`."""
    n, hidden = h_last.shape
    vocab = out_weight.shape[0]
    device = h_last.device
    d_weight, d_bias = head_sums[:vocab * hidden].view(vocab, hidden), head_sums[vocab * hidden:]
    d_weight.zero_()
    d_bias.zero_()
    weight = reusable_operand(out_weight, precision)
    d_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    chunk = max(1, HEAD_GEMM_CHUNK_ELEMENTS // (vocab * DLOGITS_BLOCK_M)) * DLOGITS_BLOCK_M
    dh = new_buffer((n, hidden), torch.float32, device)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        h = h_last[start:end]
        row_blocks = triton.cdiv(end - start, DLOGITS_BLOCK_M)
        d = new_buffer((end - start, vocab), d_dtype, device)
        bias_part = new_buffer((row_blocks, vocab), torch.float32, device)
        launch(dlogits_kernel, (row_blocks, triton.cdiv(vocab, DLOGITS_BLOCK_V)),
               matmul(h, weight.t(), precision), out_bias, targets[start:end], grad[start:end], lse[start:end],
               d, bias_part, end - start, vocab,
               BLOCK_M=DLOGITS_BLOCK_M, BLOCK_V=DLOGITS_BLOCK_V, PRECISION=precision_code(precision), num_warps=4)
        dh[start:end] = matmul(d, weight, precision)
        d_weight += matmul(d.t(), h, precision)
        d_bias += bias_part.sum(0)
    return dh


def backward(idx: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor, lse: torch.Tensor,
             acts: torch.Tensor, zs: torch.Tensor, in_weight: torch.Tensor, in_bias: torch.Tensor,
             in_gain: torch.Tensor, hidden_weight: torch.Tensor, hidden_bias: torch.Tensor,
             hidden_gain: torch.Tensor, out_weight: torch.Tensor, out_bias: torch.Tensor,
             residual_every: int, eps: float, precision: str, mode: int) -> list[torch.Tensor]:
    """[d_in_weight, d_hidden_weight, sums], each summed over the batch: sums fp32 [2 (L-1) H + V H + V]
    packs the bias gradients of the input layer and the hidden layers ([L-1, H]), their gain gradients
    (the same), the output weight's ([V, H], row-major) and the output bias's ([V]), as the reductions
    that give them write them. :func:`parameter_gradients` puts all eight in AUNNParams order (an
    operator's outputs must not alias one another, so the views are taken outside it).

    mode MODE_LOSS: grad fp32 [N] is the upstream gradient of each row's cross-entropy
    (targets, lse from the forward). mode MODE_LOGITS: grad fp32 [N, V] is dL/dlogits.
    acts (fp32, or bf16 from a bf16 forward; and zs on the layer-wise path) are the
    forward's saved activations.
    """
    weight_grad = weight_grad_method()
    device = idx.device
    n, (hidden, bits), vocab = idx.shape[0], in_weight.shape, out_weight.shape[0]
    n_hidden = hidden_weight.shape[0]
    t = choose_tiles(hidden, bits, vocab, precision, partials=weight_grad == "partials")
    prec, fast = precision_code(precision), fast_sigmoid(precision)
    n_layers = n_hidden + 1
    trunk_size, head_size = 2 * n_layers * hidden, vocab * hidden + vocab
    if n == 0:
        return [torch.zeros_like(in_weight), torch.zeros_like(hidden_weight),
                torch.zeros(trunk_size + head_size, dtype=torch.float32, device=device)]
    sums = new_buffer((trunk_size + head_size,), torch.float32, device)
    head_sums = sums[trunk_size:]
    h_last = acts[n_hidden]
    partials = t.fused and weight_grad == "partials"
    # the weights as the kernels read them: in the bf16 mode bf16 copies (mlp_forward.fused_weights,
    # head_weight), except that the fused trunk backward's "partials" form reads the output weight in
    # fp32 (with a bf16 one it fails to compile under Triton 3.6); logits()' backward reads none
    if t.fused:
        w_in, w_hidden, w_out = fused_weights(in_weight, hidden_weight, out_weight, precision, n,
                                              head=mode == MODE_LOSS and not partials)
    else:
        w_out = head_weight(out_weight, precision, n)
    row_blocks = triton.cdiv(n, t.block_m_bwd)  # of the fused trunk backward
    # dL/dh by head_dh_kernel: on the layer-wise path, and when the fused trunk backward's row blocks
    # are too few to cover a large head (each would stream all of it; see vocab_splits)
    head_dh = mode == MODE_LOSS and (not t.fused or vocab_splits(row_blocks, vocab, t.block_v, device)[0] > 1)
    # The fused trunk backward recomputes the head's logits and dlogits for its dL/dh: where the head's
    # gradients are no larger than the bias and gain partials it writes per program anyway (small
    # vocabularies), its programs (one row block each: not "partials") store them in their partial rows, and
    # head_weight_grad_kernel's pass over the batch and its reduction are saved.
    head_in_trunk = (HEAD_GRADS_IN_TRUNK and t.fused and mode == MODE_LOSS and not head_dh and not partials
                     and head_size <= trunk_size)

    # ---- head: dL/d out_weight, out_bias, and (unless fused below) dL/dh_last
    dh = None
    if mode == MODE_LOSS and head_dh and vocab >= HEAD_GEMM_MIN_VOCAB:
        dh = head_backward_gemms(h_last, targets, grad, lse, out_weight, out_bias, precision, head_sums)
    elif mode == MODE_LOSS:
        grid_v, grid_h = triton.cdiv(vocab, t.block_v), triton.cdiv(hidden, t.block_hc)
        head_blocks = triton.cdiv(n, t.block_m_head)
        if not head_in_trunk:
            splits = max(1, min(head_blocks, triton.cdiv(4 * num_sms(device), grid_v * grid_h)))
            rows_per_split = triton.cdiv(head_blocks, splits) * t.block_m_head
            splits = triton.cdiv(n, rows_per_split)
            # one split (a large head has tiles enough): its partials are the gradients
            head_part = head_sums[None] if splits == 1 else new_buffer((splits, head_size), torch.float32, device)
            launch(head_weight_grad_kernel, (grid_v, grid_h, splits),
                   h_last, targets, grad, lse, w_out, out_bias, head_part,
                   n, hidden, vocab, rows_per_split,
                   BLOCK_M=t.block_m_head, BLOCK_V=t.block_v, BLOCK_HC=t.block_hc, BLOCK_K=t.block_k_head,
                   PRECISION=prec, num_warps=t.num_warps_head)
            if splits > 1:
                torch.sum(head_part, 0, out=head_sums)
        if head_dh:
            ranges, v_per_range = vocab_splits(head_blocks * grid_h, vocab, t.block_v, device)
            dh = new_buffer((ranges, n, hidden), torch.float32, device)
            launch(head_dh_kernel, (head_blocks, grid_h, ranges),
                   h_last, targets, grad, lse, w_out, out_bias, dh, n, hidden, vocab, v_per_range,
                   BLOCK_M=t.block_m_head, BLOCK_V=t.block_v, BLOCK_HC=t.block_hc, BLOCK_K=t.block_k_head,
                   PRECISION=prec, num_warps=t.num_warps_head)
            dh = dh[0] if ranges == 1 else dh.sum(0)
    else:
        assert mode == MODE_LOGITS
        head_sums[:vocab * hidden].view(vocab, hidden).copy_(batch_reduced_matmul(grad, h_last, precision))
        torch.sum(grad, 0, out=head_sums[vocab * hidden:])
        dh = matmul(grad, out_weight, precision)

    # ---- trunk: dz of every layer (or, WEIGHT_GRAD "partials", per-program weight and bias
    # gradient partials) and per-program bias and gain partials (and the head's, head_in_trunk)
    if partials:
        programs = _persistent_programs(device, row_blocks, PARTIAL_PROGRAMS_PER_SM)
    elif t.fused:
        programs = row_blocks
    else:  # a persistent grid: the gain and bias partials stay [programs, L-1, H] however large N is
        programs = _persistent_programs(device, triton.cdiv(n, t.block_m_rowwise), ROWWISE_PROGRAMS_PER_SM)
    part_size = trunk_size + (head_size if head_in_trunk else 0)
    # one program (a prompt's few rows): its partials are the sums
    part = sums[None, :part_size] if programs == 1 else new_buffer((programs, part_size), torch.float32, device)
    if partials:
        dz, x = torch.empty(0, dtype=torch.float32, device=device), torch.empty(0, dtype=torch.float32, device=device)
        dw_in_part = new_buffer((programs, hidden, bits), torch.float32, device)
        dw_part = new_buffer((programs, n_hidden, hidden, hidden), torch.float32, device)
    else:
        # dz feeds only PyTorch's GEMMs, which round it to bf16 in bf16 mode: stored as bf16 there
        # (the kernels sum the bias gradients from fp32 dz themselves)
        dz_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        dz = new_buffer((n_layers, n, hidden), dz_dtype, device)
        # the index bits, for dW_in = dz[0].T @ x: written by the fused kernel, which has them in registers
        x = new_buffer((n, bits), dz_dtype, device) if t.fused else index_bits_matrix(idx, bits, dz_dtype)
        dw_in_part = dw_part = torch.empty(0, dtype=torch.float32, device=device)
    if t.fused:
        from_lse = dh is None
        launch(aunn_backward_kernel, (programs,),
               idx, targets, grad if from_lse else dh, lse, acts, dz, x, part, dw_in_part, dw_part,
               w_in, in_bias, in_gain, w_hidden, hidden_bias, hidden_gain, out_weight if partials else w_out,
               out_bias,
               n, hidden, vocab, n_hidden, residual_every, eps, n * hidden, n_hidden * n * hidden, part.stride(0),
               BITS=bits, BLOCK_BITS=t.block_bits, BLOCK_H=t.block_h, BLOCK_M=t.block_m_bwd, BLOCK_V=t.block_v,
               HEAD_FROM_LSE=from_lse, HEAD_GRADS=head_in_trunk, WEIGHT_GRADS=partials,
               WEIGHT_ONCE=LOAD_WEIGHT_ONCE and not partials, PRECISION=prec,
               FAST_SIGMOID=fast, num_warps=t.num_warps_bwd, **compile_options(t.max_registers_bwd))
    else:
        w_hidden = reusable_operand(hidden_weight, precision)  # cast once for every layer's dh = dz @ W
        # the residual stream's gradient, where there is a residual add
        g_res = new_buffer((n, hidden) if n_hidden >= residual_every else (0,), torch.float32, device)
        db_part, dgain_part = part.view(programs, 2, n_layers, hidden).unbind(1)
        gh, residual_seen = dh, False
        for layer in reversed(range(n_layers)):  # 0 is the input layer, l > 0 hidden layer l - 1
            residual = layer % residual_every == 0
            gain = in_gain if layer == 0 else hidden_gain[layer - 1]
            launch(layer_backward_kernel, (programs,),
                   gh, g_res, zs[layer], gain, dz[layer], dgain_part[:, layer], db_part[:, layer],
                   n, hidden, eps, part.stride(0),
                   BLOCK_M=t.block_m_rowwise, BLOCK_H=t.block_h, ADD_RES=residual and residual_seen,
                   STORE_RES=residual and layer > 0, PRECISION=prec, FAST_SIGMOID=fast, num_warps=t.num_warps)
            residual_seen |= residual
            if layer > 0:
                gh = matmul(dz[layer], w_hidden[layer - 1], precision)
    if programs > 1:
        torch.sum(part, 0, out=sums[:part_size])

    # ---- weight gradients of the trunk: partials summed, or from dz and the saved activations
    if partials:
        d_in_weight, d_hidden_weight = dw_in_part.sum(0), dw_part.sum(0)
    else:
        d_in_weight = batch_reduced_matmul(dz[0], x, precision)
        d_hidden_weight = batch_reduced_matmul(dz[1:], acts[:n_hidden], precision)
    return [d_in_weight, d_hidden_weight, sums]


def parameter_gradients(grads: list[torch.Tensor], vocab: int, hidden: int) -> list[torch.Tensor]:
    """:func:`backward`'s outputs -> the eight parameters' gradients in AUNNParams order."""
    d_in_weight, d_hidden_weight, sums = grads
    n_layers = d_hidden_weight.shape[0] + 1
    bias, gain = sums[:2 * n_layers * hidden].view(2, n_layers, hidden)
    head = sums[2 * n_layers * hidden:]
    d_out_weight, d_out_bias = head[:vocab * hidden].view(vocab, hidden), head[vocab * hidden:]
    return [d_in_weight, bias[0], gain[0], d_hidden_weight, bias[1:], gain[1:], d_out_weight, d_out_bias]
