"""AUNN backward: gradients of every parameter from the activations the forward saved.

Kernels:

* :func:`aunn_backward_kernel` (hidden <= fused_max_hidden) - each program takes row blocks
  of BLOCK_M rows (one block per program, or several on a persistent grid): recomputes the
  head's logits chunk by chunk from the last activation and the saved softmax statistics (or loads
  a given dL/dh), then walks the layers in reverse entirely in registers, recomputing each
  pre-activation z = a @ W.T + b from the saved layer input, applying the SiLU/RMSNorm
  backward and the residual bookkeeping, and propagating dL/dh = dz @ W. It writes
  per-program partial gain and bias gradients ([programs, L-1, H]) and, per weight_grad,
  either dz of every layer ([L-1, N, H]) or per-program partial weight gradients.
* :func:`layer_backward_kernel` - the layer-wise path for wide models: per layer the residual
  bookkeeping, the SiLU/RMSNorm backward from the stored pre-activations, and per-program
  gain and bias gradients.

The head's own backward is :mod:`.head_backward`. PyTorch (cuBLAS, :mod:`.gemm`) does the rest: the sums
of the per-program partials; with weight_grad "torch" the trunk's weight-gradient GEMMs (dW = dz.T @ a,
one batched product for all hidden layers); on the layer-wise path also dL/dh = dz @ W between the layers.

Launchers: :func:`backward` (the operator's body) runs the head (:mod:`.head_backward`), then the trunk
(:func:`fused_trunk_backward` or :func:`layerwise_trunk_backward`), then its weight gradients
(:func:`trunk_weight_gradients`); each takes the :class:`~.config.KernelConfig` its operator chose.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from aunn_fast.params import AUNNParams

from .common import (
    MODE_LOGITS,
    MODE_LOSS,
    compile_options,
    launch,
    new_buffer,
    numerics,
    parameter_pointers,
    persistent_programs,
)
from .config import KernelConfig, vocab_splits
from .gemm import batch_reduced_matmul, matmul, reusable_operand
from .head_backward import LossHead, logits_head_backward, loss_head_backward
from .head_blocks import head_backward_rows
from .mlp_forward import index_bits_matrix
from .precision import dot, store_activation
from .trunk_blocks import index_bits, silu_rmsnorm_backward
from .weights import fused_weights, head_weight


@triton.jit
def accumulate(ptrs, value, mask, first):
    """*ptrs = value on a program's first row block, else *ptrs += value (each program owns its slice)."""
    if first:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value + tl.load(ptrs, mask=mask, other=0.0), mask=mask)


@triton.jit
def aunn_backward_kernel(
    idx_ptr, target_ptr, grad_ptr, stats_ptr,  # the batch, its upstream gradient; the forward's statistics
    act_ptr,  # the forward's activations
    dz_ptr, x_ptr, part_ptr, dw_in_ptr, dw_ptr,  # outputs, by WEIGHT_GRADS
    in_w_ptr, in_b_ptr, in_g_ptr, hid_w_ptr, hid_b_ptr, hid_g_ptr, out_w_ptr, out_b_ptr,  # parameters
    N, V, n_hidden, residual_every, eps,  # rows, vocabulary, hidden layers, residual period; RMSNorm's epsilon
    layer_stride, last_layer, partial_stride,  # of act's and dz's layers (N * H); their last layer's offset; of part
    H: tl.constexpr, BITS: tl.constexpr,  # the model
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_BITS: tl.constexpr, BLOCK_V: tl.constexpr,  # tiles
    HEAD_FROM_STATS: tl.constexpr, HEAD_GRADS: tl.constexpr,  # what the program does
    WEIGHT_GRADS: tl.constexpr, WEIGHT_ONCE: tl.constexpr,
    PRECISION: tl.constexpr, FAST_SIGMOID: tl.constexpr,  # how it multiplies; its sigmoid
):  # fmt: skip
    """Trunk backward, all layers in registers; program p takes row blocks p, p + P, p + 2P, ...
    (P = number of programs).

    HEAD_FROM_STATS: grad is the per-row upstream gradient of the row losses fp32 [N]
    (targets int64 [N] and the softmax statistics stats fp32 [N, 3] from the forward); else grad is
    dL/dh_last fp32 [N, H].
    act fp32 or bf16 [L-1, N, H] from the forward; weights fp32 or bf16 copies (weights.fused_weights).
    Outputs, each program summing over its row blocks:
    part fp32 [P, partial_stride], program p's row: the bias gradients [L-1, H], the gain gradients
    [L-1, H] and, with HEAD_GRADS (HEAD_FROM_STATS, one row block per program), the head's (out_weight
    [V, H], out_bias [V]);
    with WEIGHT_GRADS also dw_in fp32 [P, H, BITS] (input layer) and dw fp32 [P, L-2, H, H] (hidden
    layers), and dz is not stored; without it dz [L-1, N, H] and the index bits x [N, BITS] (fp32, or
    bf16 in bf16 mode; the weight gradients are then PyTorch's).
    WEIGHT_ONCE: each hidden layer's weight is loaded as stored, W [out, in], and both products read that
    one tile (z = a @ W.T, dL/dh = dz @ W); else as W.T (KernelOptions.load_weight_once).
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

        if HEAD_FROM_STATS:
            gh = head_backward_rows(
                h_ptr=act_ptr + last_layer,
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
                v_begin=0,
                v_end=V,
                head_grads_ptr=head_grads,
                BLOCK_M=BLOCK_M,
                BLOCK_V=BLOCK_V,
                BLOCK_K=BLOCK_H,
                BLOCK_HC=BLOCK_H,
                PRECISION=PRECISION,
                HEAD_GRADS=HEAD_GRADS,
            )
        else:
            gh = tl.load(grad_ptr + act_row, mask=act_mask, other=0.0)

        # gh: dL/dh_l along the layer chain; g_res: dL/d(res) accumulated from later residual adds.
        # Rows past N have gh = 0, hence dz = 0: they add nothing to the weight gradients.
        g_res = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        # act[layer] and dz[layer + 1], stepped down one layer at a time
        act_in_ptr = act_ptr + last_layer
        dz_out_ptr = dz_ptr + last_layer
        for i in range(n_hidden):
            layer = n_hidden - 1 - i  # 0-based hidden layer; act[layer] is its input, act[layer + 1] its output
            if (layer + 1) % residual_every == 0:
                # h = y + res and res = h: both incoming gradients reach y and the earlier res
                gh = gh + g_res
                g_res = gh
            act_in_ptr -= layer_stride
            a = tl.load(act_in_ptr + act_row, mask=act_mask, other=0.0).to(tl.float32)
            if WEIGHT_ONCE:
                w = tl.load(hid_w_ptr + layer * H * H + hcols[:, None] * H + hcols[None, :], mask=hh_mask, other=0.0)
                w_t = tl.trans(w)
            else:
                w_t = tl.load(hid_w_ptr + layer * H * H + hcols[None, :] * H + hcols[:, None], mask=hh_mask, other=0.0)
                w = tl.trans(w_t)
            z = dot(a, w_t, PRECISION) + tl.load(hid_b_ptr + layer * H + hcols, mask=hmask, other=0.0)[None, :]
            dz, dgain = silu_rmsnorm_backward(
                gh, z, tl.load(hid_g_ptr + layer * H + hcols, mask=hmask, other=0.0), H, eps, FAST_SIGMOID
            )
            if WEIGHT_GRADS:
                accumulate(dw_tile + layer * H * H, dot(tl.trans(dz), a, PRECISION), hh_mask, first)
            else:
                store_activation(dz_out_ptr + act_row, dz, act_mask, PRECISION)
                dz_out_ptr -= layer_stride
            accumulate(db_row + (layer + 1) * H, tl.sum(dz, axis=0), hmask, first)
            accumulate(dgain_row + (layer + 1) * H, dgain, hmask, first)
            gh = dot(dz, w, PRECISION)

        # input layer; res started as its output
        gh = gh + g_res
        idx = tl.load(idx_ptr + rows, mask=row_mask, other=0)
        x = index_bits(idx, k, BITS)
        w_in_t = tl.load(in_w_ptr + hcols[None, :] * BITS + k[:, None], mask=dw_in_mask, other=0.0)
        z = dot(x, w_in_t, PRECISION) + tl.load(in_b_ptr + hcols, mask=hmask, other=0.0)[None, :]
        dz, dgain = silu_rmsnorm_backward(gh, z, tl.load(in_g_ptr + hcols, mask=hmask, other=0.0), H, eps, FAST_SIGMOID)
        if WEIGHT_GRADS:
            # [BLOCK_BITS, BLOCK_H] = dW_in.T: the 64-wide hidden side is the dot's output width
            accumulate(dw_in_tile, dot(tl.trans(x), dz, PRECISION), dw_in_mask, first)
        else:
            store_activation(dz_ptr + act_row, dz, act_mask, PRECISION)
            store_activation(
                x_ptr + rows[:, None] * BITS + k[None, :], x, row_mask[:, None] & (k[None, :] < BITS), PRECISION
            )
        accumulate(db_row, tl.sum(dz, axis=0), hmask, first)
        accumulate(dgain_row, dgain, hmask, first)


@triton.jit
def layer_backward_kernel(
    dy_ptr, g_res_ptr, z_ptr, g_ptr,  # dL/dh from above, the residual stream's gradient; the layer's z and gain
    dz_ptr, dgain_ptr, dbias_ptr,  # outputs
    N, H, eps,  # rows, hidden width; RMSNorm's epsilon
    partial_stride,  # of dgain and dbias
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,  # tiles
    ADD_RES: tl.constexpr, STORE_RES: tl.constexpr,  # what the program does
    PRECISION: tl.constexpr, FAST_SIGMOID: tl.constexpr,  # how it stores dz; its sigmoid
):  # fmt: skip
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
        dz, block_dgain = silu_rmsnorm_backward(
            dy, tl.load(z_ptr + offsets, mask=mask, other=0.0), gain, H, eps, FAST_SIGMOID
        )
        store_activation(dz_ptr + offsets, dz, mask, PRECISION)
        dgain += block_dgain
        dbias += tl.sum(dz, axis=0)
    tl.store(dgain_ptr + pid.to(tl.int64) * partial_stride + hcols, dgain, mask=hmask)
    tl.store(dbias_ptr + pid.to(tl.int64) * partial_stride + hcols, dbias, mask=hmask)


class TrunkOutputs(NamedTuple):
    """What a trunk backward leaves for :func:`trunk_weight_gradients`: dz fp32/bf16 [L-1, N, H] and the index
    bits x [N, bits] (weight_grad "torch"), or the per-program weight-gradient partials dw_in fp32
    [P, H, bits] and dw fp32 [P, L-2, H, H] ("partials"); the others empty."""

    dz: torch.Tensor
    x: torch.Tensor
    dw_in_part: torch.Tensor
    dw_part: torch.Tensor


def backward(
    idx: torch.Tensor,
    targets: torch.Tensor,
    grad: torch.Tensor,
    stats: torch.Tensor,
    acts: torch.Tensor,
    zs: torch.Tensor,
    params: AUNNParams,
    residual_every: int,
    eps: float,
    mode: int,
    config: KernelConfig,
) -> list[torch.Tensor]:
    """[d_in_weight, d_hidden_weight, sums], each summed over the batch: sums fp32 [2 (L-1) H + V H + V]
    packs the bias gradients of the input layer and the hidden layers ([L-1, H]), their gain gradients
    (the same), the output weight's ([V, H], row-major) and the output bias's ([V]), as the reductions
    that give them write them. :func:`parameter_gradients` puts all eight in AUNNParams order (an
    operator's outputs must not alias one another, so the views are taken outside it).

    mode MODE_LOSS: grad fp32 [N] is the upstream gradient of each row's cross-entropy
    (targets, stats from the forward). mode MODE_LOGITS: grad fp32 [N, V] is dL/dlogits.
    acts (fp32, or bf16 from a bf16 forward; and zs on the layer-wise path) are the
    forward's saved activations.
    """
    n, hidden, n_hidden = idx.shape[0], params.in_weight.shape[0], params.hidden_weight.shape[0]
    vocab, t = params.out_weight.shape[0], config.tiles
    trunk_size, head_size = 2 * (n_hidden + 1) * hidden, vocab * hidden + vocab
    if n == 0:
        return [
            torch.zeros_like(params.in_weight),
            torch.zeros_like(params.hidden_weight),
            torch.zeros(trunk_size + head_size, dtype=torch.float32, device=idx.device),
        ]
    sums = new_buffer((trunk_size + head_size,), torch.float32, idx.device, config.options.poison_outputs)
    h_last = acts[n_hidden]
    # the weights as the kernels read them: in the bf16 mode bf16 copies (weights.py), except that the fused
    # trunk backward's "partials" form reads the output weight in fp32 (with a bf16 one it fails to compile
    # under Triton 3.6); logits()' backward reads none
    if t.fused:
        in_w, hidden_w, out_w = fused_weights(
            params.in_weight,
            params.hidden_weight,
            params.out_weight,
            n,
            config,
            head=mode == MODE_LOSS and not config.partials,
        )
        read = params._replace(in_weight=in_w, hidden_weight=hidden_w, out_weight=out_w)
    else:
        read = params._replace(out_weight=head_weight(params.out_weight, config.precision, n, config.options))
    # dL/dh by the head's own kernels: on the layer-wise path, and when the fused trunk backward's row blocks
    # are too few to cover a large head (each would stream all of it; see vocab_splits)
    head_dh = mode == MODE_LOSS and (
        not t.fused or vocab_splits(triton.cdiv(n, t.block_m_bwd), vocab, t.block_v, config)[0] > 1
    )
    # The fused trunk backward recomputes the head's logits and dlogits for its dL/dh: where the head's
    # gradients are no larger than the bias and gain partials it writes per program anyway (small
    # vocabularies), its programs (one row block each: not "partials") store them in their partial rows, and
    # head_weight_grad_kernel's pass over the batch and its reduction are saved.
    head_in_trunk = (
        config.options.head_grads_in_trunk
        and t.fused
        and mode == MODE_LOSS
        and not head_dh
        and not config.partials
        and head_size <= trunk_size
    )

    if mode == MODE_LOGITS:
        dh = logits_head_backward(grad, h_last, params.out_weight, sums[trunk_size:], config)
    else:
        head = LossHead(h_last, targets, grad, stats, read.out_weight, read.out_bias)
        dh = loss_head_backward(
            head, sums[trunk_size:], want_dh=head_dh, want_weight_grads=not head_in_trunk, config=config
        )
    if t.fused:
        # the "partials" form reads the fp32 output weight (above)
        trunk_read = read._replace(out_weight=params.out_weight) if config.partials else read
        trunk = fused_trunk_backward(
            idx, targets, grad, dh, stats, acts, trunk_read, sums, head_in_trunk, residual_every, eps, config
        )
    else:
        trunk = layerwise_trunk_backward(idx, dh, zs, params, sums, residual_every, eps, config)
    return [*trunk_weight_gradients(trunk, acts, config), sums]


def fused_trunk_backward(
    idx: torch.Tensor,
    targets: torch.Tensor,
    grad: torch.Tensor,
    dh: torch.Tensor | None,
    stats: torch.Tensor,
    acts: torch.Tensor,
    read: AUNNParams,
    sums: torch.Tensor,
    head_in_trunk: bool,
    residual_every: int,
    eps: float,
    config: KernelConfig,
) -> TrunkOutputs:
    """:func:`aunn_backward_kernel` over the batch: the head's dL/dh from the statistics (dh None) or dh fp32
    [N, H]; the bias and gain gradients (and with head_in_trunk the head's) summed into sums; returns what
    :func:`trunk_weight_gradients` needs. read: the parameters as the kernel reads them (weights.py)."""
    n, (hidden, bits), n_hidden = idx.shape[0], read.in_weight.shape, read.hidden_weight.shape[0]
    device, poison, t = idx.device, config.options.poison_outputs, config.tiles
    row_blocks = triton.cdiv(n, t.block_m_bwd)
    if config.partials:
        programs = persistent_programs(config, row_blocks, config.options.partial_programs_per_sm)
    else:
        programs = row_blocks
    part_size = 2 * (n_hidden + 1) * hidden + (read.out_weight.numel() + read.out_bias.numel() if head_in_trunk else 0)
    part = partials_buffer(sums, programs, part_size, config)
    if config.partials:
        empty = idx.new_empty(0, dtype=torch.float32)
        outputs = TrunkOutputs(
            dz=empty,
            x=empty.new_empty(0),
            dw_in_part=new_buffer((programs, hidden, bits), torch.float32, device, poison),
            dw_part=new_buffer((programs, n_hidden, hidden, hidden), torch.float32, device, poison),
        )
    else:
        # dz feeds only PyTorch's GEMMs, which round it to bf16 in bf16 mode: stored as bf16 there (the kernel
        # sums the bias gradients from fp32 dz itself); the index bits, for dW_in = dz[0].T @ x, too
        dz_dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        empty = idx.new_empty(0, dtype=torch.float32)
        outputs = TrunkOutputs(
            dz=new_buffer((n_hidden + 1, n, hidden), dz_dtype, device, poison),
            x=new_buffer((n, bits), dz_dtype, device, poison),
            dw_in_part=empty,
            dw_part=empty.new_empty(0),
        )
    from_stats = dh is None
    launch(
        aunn_backward_kernel,
        (programs,),
        idx_ptr=idx,
        target_ptr=targets,
        grad_ptr=grad if from_stats else dh,
        stats_ptr=stats,
        act_ptr=acts,
        dz_ptr=outputs.dz,
        x_ptr=outputs.x,
        part_ptr=part,
        dw_in_ptr=outputs.dw_in_part,
        dw_ptr=outputs.dw_part,
        **parameter_pointers(read),
        N=n,
        V=read.out_weight.shape[0],
        n_hidden=n_hidden,
        residual_every=residual_every,
        eps=eps,
        layer_stride=n * hidden,
        last_layer=n_hidden * n * hidden,
        partial_stride=part.stride(0),
        H=hidden,
        BITS=bits,
        BLOCK_M=t.block_m_bwd,
        BLOCK_H=t.block_h,
        BLOCK_BITS=t.block_bits,
        BLOCK_V=t.block_v,
        HEAD_FROM_STATS=from_stats,
        HEAD_GRADS=head_in_trunk,
        WEIGHT_GRADS=config.partials,
        WEIGHT_ONCE=config.options.load_weight_once and not config.partials,
        **numerics(config),
        num_warps=t.num_warps_bwd,
        **compile_options(t.max_registers_bwd),
    )
    sum_partials(part, sums)
    return outputs


def layerwise_trunk_backward(
    idx: torch.Tensor,
    dh: torch.Tensor,
    zs: torch.Tensor,
    params: AUNNParams,
    sums: torch.Tensor,
    residual_every: int,
    eps: float,
    config: KernelConfig,
) -> TrunkOutputs:
    """The trunk of a wide model backwards, one layer at a time from dL/dh_last dh fp32 [N, H] and the
    pre-activations zs fp32 [L-1, N, H]: :func:`layer_backward_kernel` (residual bookkeeping, SiLU/RMSNorm
    backward, bias and gain partials summed into sums), then dL/dh = dz @ W by a PyTorch GEMM."""
    n, (hidden, bits), n_hidden = idx.shape[0], params.in_weight.shape, params.hidden_weight.shape[0]
    n_layers, device, poison, t = n_hidden + 1, idx.device, config.options.poison_outputs, config.tiles
    # a persistent grid: the gain and bias partials stay [programs, L-1, H] however large N is
    programs = persistent_programs(config, triton.cdiv(n, t.block_m_rowwise), config.options.rowwise_programs_per_sm)
    part = partials_buffer(sums, programs, 2 * n_layers * hidden, config)
    dz_dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32  # only GEMMs read dz
    dz = new_buffer((n_layers, n, hidden), dz_dtype, device, poison)
    w_hidden = reusable_operand(params.hidden_weight, config.precision)  # cast once for every layer's dz @ W
    # the residual stream's gradient, where there is a residual add
    g_res = new_buffer((n, hidden) if n_hidden >= residual_every else (0,), torch.float32, device, poison)
    db_part, dgain_part = part.view(programs, 2, n_layers, hidden).unbind(1)
    gh, residual_seen = dh, False
    for layer in reversed(range(n_layers)):  # 0 is the input layer, l > 0 hidden layer l - 1
        residual = layer % residual_every == 0
        launch(
            layer_backward_kernel,
            (programs,),
            dy_ptr=gh,
            g_res_ptr=g_res,
            z_ptr=zs[layer],
            g_ptr=params.in_gain if layer == 0 else params.hidden_gain[layer - 1],
            dz_ptr=dz[layer],
            dgain_ptr=dgain_part[:, layer],
            dbias_ptr=db_part[:, layer],
            N=n,
            H=hidden,
            eps=eps,
            partial_stride=part.stride(0),
            BLOCK_M=t.block_m_rowwise,
            BLOCK_H=t.block_h,
            ADD_RES=residual and residual_seen,
            STORE_RES=residual and layer > 0,
            **numerics(config),
            num_warps=t.num_warps,
        )
        residual_seen |= residual
        if layer > 0:
            gh = matmul(dz[layer], w_hidden[layer - 1], config.precision)
    sum_partials(part, sums)
    empty = idx.new_empty(0, dtype=torch.float32)
    return TrunkOutputs(
        dz=dz, x=index_bits_matrix(idx, bits, dz_dtype, poison), dw_in_part=empty, dw_part=empty.new_empty(0)
    )


def partials_buffer(sums: torch.Tensor, programs: int, size: int, config: KernelConfig) -> torch.Tensor:
    """fp32 [programs, size]: each program's partial sums of sums[:size]; with one program (a prompt's few
    rows) a view of sums itself, its partials being the sums."""
    if programs == 1:
        return sums[None, :size]
    return new_buffer((programs, size), torch.float32, sums.device, config.options.poison_outputs)


def sum_partials(part: torch.Tensor, sums: torch.Tensor) -> None:
    """sums[:size] = the programs' partials part [programs, size] summed (nothing to do for one program)."""
    if part.shape[0] > 1:
        torch.sum(part, 0, out=sums[: part.shape[1]])


def trunk_weight_gradients(
    trunk: TrunkOutputs, acts: torch.Tensor, config: KernelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_in_weight fp32 [H, bits], d_hidden_weight fp32 [L-2, H, H]): the "partials" summed, or dz.T @ a by
    batch-split PyTorch products (gemm.batch_reduced_matmul) from dz, the index bits and the activations."""
    if config.partials:
        return trunk.dw_in_part.sum(0), trunk.dw_part.sum(0)
    min_rows, n_hidden = config.options.split_k_min_rows, trunk.dz.shape[0] - 1
    return (
        batch_reduced_matmul(trunk.dz[0], trunk.x, config.precision, min_rows),
        batch_reduced_matmul(trunk.dz[1:], acts[:n_hidden], config.precision, min_rows),
    )


def parameter_gradients(grads: list[torch.Tensor], vocab: int, hidden: int) -> AUNNParams:
    """:func:`backward`'s outputs -> the eight parameters' gradients."""
    d_in_weight, d_hidden_weight, sums = grads
    n_layers = d_hidden_weight.shape[0] + 1
    bias, gain = sums[: 2 * n_layers * hidden].view(2, n_layers, hidden)
    head = sums[2 * n_layers * hidden :]
    d_out_weight, d_out_bias = head[: vocab * hidden].view(vocab, hidden), head[vocab * hidden :]
    return AUNNParams(
        in_weight=d_in_weight,
        in_bias=bias[0],
        in_gain=gain[0],
        hidden_weight=d_hidden_weight,
        hidden_bias=bias[1:],
        hidden_gain=gain[1:],
        out_weight=d_out_weight,
        out_bias=d_out_bias,
    )
