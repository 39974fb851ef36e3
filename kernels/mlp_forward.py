"""AUNN forward: trunk (input layer + hidden layers) and output head, fused.

Kernels:

* :func:`aunn_forward_kernel` - one program per BLOCK_M indices. With FUSED_TRUNK the
  whole trunk runs in registers (index bits -> input layer -> every hidden layer,
  residuals included); the head then loops over the vocabulary in BLOCK_V chunks and
  finishes per MODE: 0 stores logits, 1 keeps a running argmax, 2 keeps an online
  softmax sum plus the target logit and stores the per-row loss and softmax statistics. Without
  FUSED_TRUNK the trunk's last activation is read from memory (layer-wise path). With
  few row blocks and a large vocabulary a second grid axis splits the vocabulary into
  ranges (``config.vocab_splits``) whose partial results :func:`combine_ranges` merges.
* :func:`layer_epilogue_kernel` - the layer-wise path for wide models: per layer a
  PyTorch GEMM (cuBLAS), then this kernel: bias + SiLU + RMSNorm * gain (+ residual).
* :func:`index_bits_kernel` - the layer-wise path's input: the index bits as a GEMM operand.

Launchers: :func:`forward` (the operator's body), :func:`layerwise_trunk`, :func:`launch_forward_kernel`,
:func:`combine_ranges`. Every launcher takes the :class:`~.config.KernelConfig` its operator chose.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aunn_fast.params import AUNNParams

from .common import (
    MODE_ARGMAX,
    MODE_LOGITS,
    MODE_LOSS,
    compile_options,
    launch,
    new_buffer,
    numerics,
    parameter_pointers,
)
from .config import KernelConfig, vocab_splits
from .gemm import matmul
from .head_blocks import cross_entropy_stats, head_bias, head_logits_tile, load_targets
from .precision import dot, store_activation
from .trunk_blocks import index_bits, silu_rmsnorm
from .weights import bf16_copies, fused_weights, head_weight


@triton.jit
def hidden_layer(
    h, w_ptr, b_ptr, g_ptr, layer, H, eps, hcols, hmask, PRECISION: tl.constexpr, FAST_SIGMOID: tl.constexpr
):
    """Hidden layer ``layer`` on a register tile: RMSNorm(SiLU(h @ W[layer].T + b[layer])) * g[layer].

    h fp32 [M, BLOCK_H]; w fp32 or bf16 [n_hidden, H, H], b and g fp32 [n_hidden, H]."""
    w_t = tl.load(
        w_ptr + layer * H * H + hcols[None, :] * H + hcols[:, None], mask=hmask[:, None] & hmask[None, :], other=0.0
    )
    z = dot(h, w_t, PRECISION) + tl.load(b_ptr + layer * H + hcols, mask=hmask, other=0.0)[None, :]
    return silu_rmsnorm(z, tl.load(g_ptr + layer * H + hcols, mask=hmask, other=0.0), H, eps, FAST_SIGMOID)


@triton.jit
def aunn_forward_kernel(
    idx_ptr, target_ptr,  # the batch
    out_ptr, stats_ptr, part_ptr,  # outputs, by MODE
    act_ptr,  # activations
    in_w_ptr, in_b_ptr, in_g_ptr, hid_w_ptr, hid_b_ptr, hid_g_ptr, out_w_ptr, out_b_ptr,  # parameters
    N, V, n_hidden, eps,  # rows, vocabulary, hidden layers; RMSNorm's epsilon
    layer_stride, v_per_range,  # of act's layers (N * H); vocabulary entries per program of axis 1
    H: tl.constexpr, BITS: tl.constexpr, RESIDUAL_EVERY: tl.constexpr,  # the model
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_BITS: tl.constexpr, BLOCK_V: tl.constexpr,  # tiles
    BLOCK_K: tl.constexpr,
    MODE: tl.constexpr, FUSED_TRUNK: tl.constexpr, STORE_ACTS: tl.constexpr,  # what the program does
    RANGE_PARTIALS: tl.constexpr, UNROLL_GROUPS: tl.constexpr,
    PRECISION: tl.constexpr, FAST_SIGMOID: tl.constexpr,  # how it multiplies; its sigmoid
):  # fmt: skip
    """Forward of BLOCK_M indices (program axis 0) over the vocabulary range [r * v_per_range,
    (r + 1) * v_per_range) (program axis 1: r; v_per_range a multiple of BLOCK_V; a one-range
    grid covers all V).

    The batch: idx int64 [N]; target int64 [N] (MODE 2). The parameters as in AUNNParams, fp32 or bf16 copies
    (:func:`weights.fused_weights`).
    Activations: with FUSED_TRUNK act fp32 or bf16 [n_hidden + 1, N, H], each layer's output (the input of the
    next), written when STORE_ACTS; without it act [N, H] is the last layer's, the head's input.
    out: MODE 0 logits fp32 [N, V]; MODE 1 argmax int64 [N]; MODE 2 per-row CE fp32 [N]
    (and the softmax statistics stats fp32 [N, 3] for the backward, see :func:`head_blocks.cross_entropy_stats`).
    With RANGE_PARTIALS (several ranges), modes 1 and 2 store their range's partial results instead, for
    :func:`combine_ranges`: part fp32 [ranges, 3, N] holds MODE 1 (best logit, its index, -),
    MODE 2 (max logit, sum of exp(logit - max) over the non-target entries, target logit or 0);
    out and stats are not written.
    A fused trunk is then recomputed by every range's program and stored by range 0's.
    UNROLL_GROUPS: the hidden layers up to the last residual add run as unrolled groups of RESIDUAL_EVERY.
    """
    pid = tl.program_id(0)
    v_range = tl.program_id(1)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    hcols = tl.arange(0, BLOCK_H)
    hmask = hcols < H
    act_row = rows[:, None] * H + hcols[None, :]
    # every vocabulary range's program computes the fused trunk; range 0's stores it
    act_store_mask = (rows < tl.where(v_range == 0, N, 0))[:, None] & hmask[None, :]

    if FUSED_TRUNK:
        # input layer: h = RMSNorm(SiLU(bits @ W_in.T + b_in)) * g_in
        idx = tl.load(idx_ptr + rows, mask=row_mask, other=0)
        k = tl.arange(0, BLOCK_BITS)
        x = index_bits(idx, k, BITS)
        w_in_t = tl.load(
            in_w_ptr + hcols[None, :] * BITS + k[:, None], mask=(k[:, None] < BITS) & hmask[None, :], other=0.0
        )
        z = dot(x, w_in_t, PRECISION) + tl.load(in_b_ptr + hcols, mask=hmask, other=0.0)[None, :]
        h = silu_rmsnorm(z, tl.load(in_g_ptr + hcols, mask=hmask, other=0.0), H, eps, FAST_SIGMOID)
        res = h
        out_act_ptr = act_ptr  # advanced one layer at a time
        if STORE_ACTS:
            store_activation(out_act_ptr + act_row, h, act_store_mask, PRECISION)
        # hidden layers; after every RESIDUAL_EVERY-th, h += res and res = h
        if UNROLL_GROUPS:
            # groups of RESIDUAL_EVERY layers unrolled, each ending with the add, then the layers
            # after the last group: the add sits at a fixed place in the code. (A per-layer
            # test for it compiles to two selects per element on every layer; but every copy
            # of a layer in the code takes its own shared memory, too much at H = 128.)
            n_groups = n_hidden // RESIDUAL_EVERY
            for group in range(n_groups):
                for j in tl.static_range(RESIDUAL_EVERY):
                    h = hidden_layer(
                        h=h,
                        w_ptr=hid_w_ptr,
                        b_ptr=hid_b_ptr,
                        g_ptr=hid_g_ptr,
                        layer=group * RESIDUAL_EVERY + j,
                        H=H,
                        eps=eps,
                        hcols=hcols,
                        hmask=hmask,
                        PRECISION=PRECISION,
                        FAST_SIGMOID=FAST_SIGMOID,
                    )
                    if j == RESIDUAL_EVERY - 1:
                        h = h + res
                        res = h
                    if STORE_ACTS:
                        out_act_ptr += layer_stride
                        store_activation(out_act_ptr + act_row, h, act_store_mask, PRECISION)
            first_ungrouped = n_groups * RESIDUAL_EVERY
        else:
            first_ungrouped = 0
        for layer in range(first_ungrouped, n_hidden):
            h = hidden_layer(h, hid_w_ptr, hid_b_ptr, hid_g_ptr, layer, H, eps, hcols, hmask, PRECISION, FAST_SIGMOID)
            if not UNROLL_GROUPS and (layer + 1) % RESIDUAL_EVERY == 0:
                h = h + res
                res = h
            if STORE_ACTS:
                out_act_ptr += layer_stride
                store_activation(out_act_ptr + act_row, h, act_store_mask, PRECISION)

    # head, BLOCK_V vocabulary entries at a time
    best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    best_arg = tl.zeros((BLOCK_M,), dtype=tl.int32)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    other_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # the non-target entries' share of the softmax sum
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if MODE == 2:
        target = load_targets(target_ptr, rows, row_mask)
    v_begin = v_range * v_per_range
    for v0 in range(v_begin, tl.minimum(V, v_begin + v_per_range), BLOCK_V):
        vcols = v0 + tl.arange(0, BLOCK_V)
        vmask = vcols < V
        if FUSED_TRUNK:
            w_out_t = tl.load(
                out_w_ptr + vcols[None, :] * H + hcols[:, None], mask=hmask[:, None] & vmask[None, :], other=0.0
            )
            logits = dot(h, w_out_t, PRECISION) + head_bias(out_b_ptr, vcols, vmask)[None, :]
        else:
            logits = head_logits_tile(
                h_ptr=act_ptr,
                rows=rows,
                row_mask=row_mask,
                w_ptr=out_w_ptr,
                b_ptr=out_b_ptr,
                vcols=vcols,
                vmask=vmask,
                H=H,
                BLOCK_M=BLOCK_M,
                BLOCK_V=BLOCK_V,
                BLOCK_K=BLOCK_K,
                PRECISION=PRECISION,
            )
        if MODE == 0:
            tl.store(out_ptr + rows[:, None] * V + vcols[None, :], logits, mask=row_mask[:, None] & vmask[None, :])
        else:
            chunk_max = tl.max(logits, axis=1)
            if MODE == 1:
                # strict '>' keeps the earlier chunk on ties; tl.argmax keeps the first within a chunk
                better = chunk_max > best
                best_arg = tl.where(better, tl.argmax(logits, axis=1, tie_break_left=True) + v0, best_arg)
                best = tl.where(better, chunk_max, best)
            else:
                new_max = tl.maximum(run_max, chunk_max)
                is_target = vcols[None, :] == target[:, None]
                others = tl.where(is_target, 0.0, tl.exp(logits - new_max[:, None]))
                other_sum = other_sum * tl.exp(run_max - new_max) + tl.sum(others, axis=1)
                run_max = new_max
                target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)

    if RANGE_PARTIALS:
        part = part_ptr + v_range.to(tl.int64) * 3 * N + rows
        if MODE == 1:
            tl.store(part, best, mask=row_mask)
            tl.store(part + N, best_arg.to(tl.float32), mask=row_mask)  # exact: fp32 holds integers to 2^24
        if MODE == 2:
            tl.store(part, run_max, mask=row_mask)
            tl.store(part + N, other_sum, mask=row_mask)
            tl.store(part + 2 * N, target_logit, mask=row_mask)
    elif MODE == 1:
        tl.store(out_ptr + rows, best_arg.to(tl.int64), mask=row_mask)
    elif MODE == 2:
        row_loss, log_sum, target_complement = cross_entropy_stats(run_max, other_sum, target_logit)
        tl.store(out_ptr + rows, row_loss, mask=row_mask)
        tl.store(stats_ptr + 3 * rows, run_max, mask=row_mask)
        tl.store(stats_ptr + 3 * rows + 1, log_sum, mask=row_mask)
        tl.store(stats_ptr + 3 * rows + 2, target_complement, mask=row_mask)


@triton.jit
def layer_epilogue_kernel(
    xw_ptr, b_ptr, g_ptr,  # the layer's GEMM output, bias and gain
    res_ptr, z_ptr, h_ptr,  # the residual stream (read and written); outputs
    N, H, eps,  # rows, hidden width; RMSNorm's epsilon
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,  # tiles
    ADD_RES: tl.constexpr, STORE_RES: tl.constexpr, STORE_Z: tl.constexpr,  # what the program does
    PRECISION: tl.constexpr, FAST_SIGMOID: tl.constexpr,  # how it stores h; its sigmoid
):  # fmt: skip
    """Everything of one layer after its GEMM, for BLOCK_M whole rows (RMSNorm needs the row):

        z = xw + b;  h = RMSNorm(SiLU(z)) * g;  with ADD_RES h += res;  with STORE_RES res = h

    xw fp32 [N, H] (x @ W.T, from :func:`gemm.matmul`); z fp32 [N, H] (stored when STORE_Z, for
    the backward); res fp32 [N, H], the residual stream, read and written in place; h [N, H] fp32
    or, in the bf16 mode, bf16: the next GEMM's operand.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    hcols = tl.arange(0, BLOCK_H)
    hmask = hcols < H
    offsets = rows[:, None] * H + hcols[None, :]
    mask = (rows < N)[:, None] & hmask[None, :]
    z = tl.load(xw_ptr + offsets, mask=mask, other=0.0) + tl.load(b_ptr + hcols, mask=hmask, other=0.0)[None, :]
    if STORE_Z:
        tl.store(z_ptr + offsets, z, mask=mask)
    h = silu_rmsnorm(z, tl.load(g_ptr + hcols, mask=hmask, other=0.0), H, eps, FAST_SIGMOID)
    if ADD_RES:
        h += tl.load(res_ptr + offsets, mask=mask, other=0.0)
    if STORE_RES:
        tl.store(res_ptr + offsets, h, mask=mask)
    store_activation(h_ptr + offsets, h, mask, PRECISION)


@triton.jit
def index_bits_kernel(idx_ptr, x_ptr, N, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_BITS: tl.constexpr):
    """x [N, BITS] (fp32 or bf16) with x[i, j] = bit j of idx[i], idx int64 [N]."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_BITS)
    row_mask = rows < N
    bits = index_bits(tl.load(idx_ptr + rows, mask=row_mask, other=0), cols, BITS)
    tl.store(
        x_ptr + rows[:, None] * BITS + cols[None, :],
        bits.to(x_ptr.dtype.element_ty),
        mask=row_mask[:, None] & (cols < BITS)[None, :],
    )


def index_bits_matrix(idx: torch.Tensor, bits: int, dtype: torch.dtype, poison: bool) -> torch.Tensor:
    """The input layer's GEMM operand: [N, bits] of dtype, one launch (no int64 [N, bits] temporary)."""
    x = new_buffer((idx.shape[0], bits), dtype, idx.device, poison)
    block_m = 128
    launch(
        index_bits_kernel,
        (triton.cdiv(idx.shape[0], block_m),),
        idx_ptr=idx,
        x_ptr=x,
        N=idx.shape[0],
        BITS=bits,
        BLOCK_M=block_m,
        BLOCK_BITS=max(16, triton.next_power_of_2(bits)),
        num_warps=4,
    )
    return x


def layerwise_trunk(
    idx: torch.Tensor,
    params: AUNNParams,
    outs: list[torch.Tensor],
    zs: torch.Tensor,
    save: bool,
    residual_every: int,
    eps: float,
    config: KernelConfig,
) -> None:
    """The trunk of a wide model, one layer at a time: ``xw = x @ W.T`` by a PyTorch GEMM
    (cuBLAS; :func:`gemm.matmul`), then :func:`layer_epilogue_kernel`.

    outs[l] [N, H] receives layer l's output (l = 0 the input layer): the activation the next
    GEMM and the head read, so bf16 in the bf16 mode. With save, zs [L-1, N, H] fp32 receives
    the pre-activations. The residual stream stays fp32 in a buffer of its own.
    """
    n, (hidden, bits), n_hidden = idx.shape[0], params.in_weight.shape, params.hidden_weight.shape[0]
    t, poison = config.tiles, config.options.poison_outputs
    x = index_bits_matrix(idx, bits, outs[0].dtype, poison)
    # in bf16 the GEMMs' weight operands: both weights' copies by one launch (cast separately, two)
    in_w, hidden_w = params.in_weight, params.hidden_weight
    if config.precision == "bf16":
        in_w, hidden_w = bf16_copies([in_w, hidden_w], config.device.interpreted)
    weights = [in_w, *hidden_w]
    biases, gains = [params.in_bias, *params.hidden_bias], [params.in_gain, *params.hidden_gain]
    has_residual = n_hidden >= residual_every
    res = new_buffer((n, hidden) if has_residual else (0,), torch.float32, idx.device, poison)
    for layer, (w, b, g, h) in enumerate(zip(weights, biases, gains, outs)):
        residual = has_residual and layer % residual_every == 0  # the input layer (0) starts the stream
        launch(
            layer_epilogue_kernel,
            (triton.cdiv(n, t.block_m_rowwise),),
            xw_ptr=matmul(x, w.t(), config.precision),
            b_ptr=b,
            g_ptr=g,
            res_ptr=res,
            z_ptr=zs[layer] if save else zs,
            h_ptr=h,
            N=n,
            H=hidden,
            eps=eps,
            BLOCK_M=t.block_m_rowwise,
            BLOCK_H=t.block_h,
            ADD_RES=residual and layer > 0,
            STORE_RES=residual,
            STORE_Z=save,
            **numerics(config),
            num_warps=t.num_warps,
        )
        x = h


def forward(
    idx: torch.Tensor,
    targets: torch.Tensor,
    params: AUNNParams,
    residual_every: int,
    eps: float,
    mode: int,
    save: bool,
    config: KernelConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns (out, stats, acts, zs).

    out: logits fp32 [N, V] (mode 0) | argmax int64 [N] (mode 1) | per-row CE fp32 [N] (mode 2).
    stats: the softmax statistics fp32 [N, 3] in mode 2 (row max, log of the sum of exp(logit - max),
    1 - p_target; :func:`head_blocks.cross_entropy_stats`), else empty.
    acts: [L-1, N, H] activations after each layer when save, else empty; bf16 when precision
    is bf16 (each reader rounds them to bf16 anyway; residual sums stay fp32), else fp32.
    zs: fp32 [L-1, N, H] pre-activations on the layer-wise path when save, else empty.
    """
    device, poison = idx.device, config.options.poison_outputs
    n, hidden, n_hidden = idx.shape[0], params.in_weight.shape[0], params.hidden_weight.shape[0]
    vocab = params.out_weight.shape[0]
    fused = config.tiles.fused
    f32 = torch.float32
    out_shape, out_dtype = {MODE_LOGITS: ((n, vocab), f32), MODE_ARGMAX: ((n,), torch.int64), MODE_LOSS: ((n,), f32)}[
        mode
    ]
    out = new_buffer(out_shape, out_dtype, device, poison)
    stats = new_buffer((n, 3) if mode == MODE_LOSS else (0,), f32, device, poison)
    # (distinct empty tensors: an operator's outputs must not alias one another)
    act_dtype = torch.bfloat16 if config.precision == "bf16" else f32
    layers_shape = (n_hidden + 1, n, hidden)
    acts = new_buffer(layers_shape, act_dtype, device, poison) if save else idx.new_empty(0, dtype=f32)
    zs = new_buffer(layers_shape, f32, device, poison) if save and not fused else idx.new_empty(0, dtype=f32)
    if n == 0:
        return out, stats, acts, zs

    head_in = acts  # fused: where the trunk stores every layer's output (when save)
    if not fused:
        # without save, two buffers in turn hold the layers' outputs; the last one feeds the head
        scratch = (
            [] if save else [new_buffer((n, hidden), act_dtype, device, poison) for _ in range(min(2, n_hidden + 1))]
        )
        outs = list(acts) if save else [scratch[layer % 2] for layer in range(n_hidden + 1)]
        layerwise_trunk(idx, params, outs, zs, save, residual_every, eps, config)
        head_in = outs[-1]  # the last layer's output
    out, stats = launch_forward_kernel(
        idx, targets, params, out, stats, head_in, residual_every, eps, mode, save, config
    )
    return out, stats, acts, zs


def launch_forward_kernel(
    idx: torch.Tensor,
    targets: torch.Tensor,
    params: AUNNParams,
    out: torch.Tensor,
    stats: torch.Tensor,
    acts: torch.Tensor,
    residual_every: int,
    eps: float,
    mode: int,
    save: bool,
    config: KernelConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`aunn_forward_kernel` over the batch, its vocabulary ranges combined: the fused trunk (storing every
    layer's output in acts [L-1, N, H] when save) and the head, or the head alone on the layer-wise path's last
    activation acts [N, H]. Returns (out, stats)."""
    n, (hidden, bits), vocab = idx.shape[0], params.in_weight.shape, params.out_weight.shape[0]
    n_hidden = params.hidden_weight.shape[0]
    t = config.tiles
    row_blocks = triton.cdiv(n, t.block_m)
    ranges, v_per_range = vocab_splits(row_blocks, vocab, t.block_v, config)
    range_partials = ranges > 1 and mode != MODE_LOGITS  # logits of several ranges need no combining
    part = new_buffer(
        (ranges, 3, n) if range_partials else (0,), torch.float32, idx.device, config.options.poison_outputs
    )
    # unrolled residual groups only where the extra copies of a layer fit: not at H = 128 (305 KiB
    # of shared memory), not in fp32 (its FMA-unit products then spill KBs), not past 4 layers
    unroll_groups = t.fused and t.block_h <= 64 and config.precision != "fp32" and residual_every <= min(n_hidden, 4)
    if t.fused:
        in_w, hidden_w, out_w = fused_weights(params.in_weight, params.hidden_weight, params.out_weight, n, config)
        read = params._replace(in_weight=in_w, hidden_weight=hidden_w, out_weight=out_w)
    else:
        read = params._replace(out_weight=head_weight(params.out_weight, config.precision, n, config.options))
    if targets.numel() == 0:
        targets = idx  # placeholder pointer, never read unless mode == MODE_LOSS
    launch(
        aunn_forward_kernel,
        (row_blocks, ranges),
        idx_ptr=idx,
        target_ptr=targets,
        out_ptr=out,
        stats_ptr=stats,
        part_ptr=part,
        act_ptr=acts,
        **parameter_pointers(read),
        N=n,
        V=vocab,
        n_hidden=n_hidden,
        eps=eps,
        layer_stride=n * hidden,
        v_per_range=v_per_range,
        H=hidden,
        BITS=bits,
        RESIDUAL_EVERY=residual_every,
        BLOCK_M=t.block_m,
        BLOCK_H=t.block_h,
        BLOCK_BITS=t.block_bits,
        BLOCK_V=t.block_v,
        BLOCK_K=t.block_k_head,
        MODE=mode,
        FUSED_TRUNK=t.fused,
        STORE_ACTS=save and t.fused,
        RANGE_PARTIALS=range_partials,
        UNROLL_GROUPS=unroll_groups,
        **numerics(config),
        num_warps=t.num_warps,
        **compile_options(t.max_registers, t.num_stages),
    )
    if range_partials:
        return combine_ranges(part, mode, stats)
    return out, stats


def combine_ranges(part: torch.Tensor, mode: int, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, stats) of the head from its vocabulary ranges' partials (see :func:`aunn_forward_kernel`).

    part fp32 [ranges, 3, N]. MODE_ARGMAX: out int64 [N], the index of the best logit, on ties
    the first range's (torch.argmax keeps the first maximum, as each range kept its first); stats
    is passed through. MODE_LOSS: out fp32 [N] the cross-entropy, stats fp32 [N, 3] the softmax
    statistics, computed as :func:`head_blocks.cross_entropy_stats` computes them.
    """
    if mode == MODE_ARGMAX:
        best_range = part[:, 0].argmax(0, keepdim=True)
        return part[:, 1].gather(0, best_range).squeeze(0).long(), stats
    range_max, range_other_sum, range_target_logit = part.unbind(1)
    row_max = range_max.amax(0)
    other_sum = (range_other_sum * torch.exp(range_max - row_max)).sum(0)
    target_logit = range_target_logit.sum(0)  # one range holds it, the others 0
    total = other_sum + torch.exp(target_logit - row_max)
    log_sum = total.log()
    row_loss = torch.where(target_logit == row_max, other_sum.log1p(), (row_max - target_logit) + log_sum)
    return row_loss, torch.stack([row_max, log_sum, other_sum / total], 1)
