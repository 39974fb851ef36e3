"""Time the fused kernels' candidate configurations against each other (CUDA only).

    python -m aunn_fast.bench.kernel_variants --out DIR [--programs-per-sm 1,2,4]
        [--workloads predict,train,train-graph] [--shapes seed,notebook,H128,bpe,prompt] [--precisions bf16,fp32]
        [--labels "torch + tanh;torch + tanh + fp32 weights"]

Each candidate is a :class:`~aunn_fast.kernels.config.KernelOptions` value (as ``triton.Config`` lists are
configurations), passed to the kernels' calls: the trunk weight-gradient method ("torch" or "partials", the
latter once per ``--programs-per-sm`` value), the sigmoid ("exact" or "tanh", bf16 only), tile overrides (rows
per program, warps, register caps, pipeline stages), the widest fused model (0 runs H=128 on the layer-wise
path), the weight-gradient products' split over the batch, the head's vocabulary ranges at few rows, the fp32
mode's products ("tf32x3" or "ieee"), the bf16 weight copies of large batches ("+ fp32 weights": none),
where a small head's gradients are summed ("+ head kernel"), how the trunk backward reads each hidden weight
("+ weight as W.T") and how a large head's backward runs ("+ head backward by products"). docs/kernels.md
lists every field.
``--labels`` keeps only the named candidates of each step.
Three workloads, run most decisive first (:func:`default_plan`), as a time limit may cut the run:

* predict - forward + argmax (``kernels.predict``), bf16, seed model (H=64) at 16M and H=128 at 4M,
  fp32 at 16M (seed), last the bpe model (H=256, vocab 50,257) at 2,048;
* train   - forward + loss + backward (``torch.autograd.grad``, no optimizer), the seed model at 1M
  and H=128 at 512K in bf16 (at 65,536 the H100 ran it host-bound), then in fp32; last the bpe model
  at 16,384 (the head backward's columns) and at a 64-index prompt (conditioning's latency, less the
  SGD step);
* train-graph - the same replayed from one CUDA graph, where eager launches would be host-bound: H=512
  at 2,048 (its per-layer kernels' tiles), the seed model at 8,192 and 65,536, and at a 2-index prompt.

Every candidate is checked against the fp32 reference at min(batch, 65536) rows first
(predict: the logits; train: every gradient; max |x - ref| / max |ref|, tolerances of
bench/checks.py) and timed only when correct: do_bench median on CUDA.
DIR/kernel_variants.md and .json are rewritten after every row, so a run cut short
still leaves its data. Exit status: 0; 1 when a candidate was incorrect or raised; 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from aunn_fast import AUNNConfig, AUNNParams, kernels, reference
from aunn_fast.kernels.config import KernelOptions, choose_tiles, default_options

from .checks import TOLERANCES
from .environment import describe
from .harness import nontrivial_model
from .options import comma_separated, counts, names_from, out_dir
from .timing import QUICK, median_ms

CHECK_ROWS = 65536
# At the timed batch each candidate's output is compared with that of the step's first candidate that
# passed its check (the default, normally): gradients within the precision's tolerance, predictions agreeing
# on this share of rows (near ties may legitimately go the other way, e.g. with the tanh sigmoid; a fault
# past the checked rows would not).
FULL_BATCH_AGREEMENT = 0.99


# a threshold no batch or vocabulary reaches: the candidate never takes that path
NEVER = 1 << 62


@dataclass(frozen=True)
class Variant:
    """One candidate configuration of the kernels."""

    label: str
    options: KernelOptions


def variant(
    label: str,
    weight_grad: str = "torch",
    sigmoid: str = "exact",
    tiles: tuple[tuple[str, int], ...] = (),
    **changes: Any,
) -> Variant:
    """A candidate: the default options (the environment's switches read) with the "torch" weight gradients,
    the exact sigmoid, the tile overrides and the other KernelOptions fields given."""
    return Variant(label, replace(default_options(), weight_grad=weight_grad, sigmoid=sigmoid, tiles=tiles, **changes))


@dataclass(frozen=True)
class Step:
    """One shape of one workload (every model: 8 layers, 64 bits), with the variants to run."""

    workload: str  # "predict" or "train"
    shape: str
    hidden: int
    batch: int
    precision: str
    variants: list[Variant]
    vocab: int = 4


def default_plan(programs_per_sm: list[int]) -> list[Step]:
    """The steps in the order they are run: most decisive first, as a time limit may cut the run."""
    partials = [
        variant("partials" if len(programs_per_sm) == 1 else f"partials x{k}/SM", "partials", partial_programs_per_sm=k)
        for k in programs_per_sm
    ]
    tanh = [Variant(f"{v.label} + tanh", replace(v.options, sigmoid="tanh")) for v in [variant("torch"), *partials]]

    def backward_tiles(hidden: int) -> list[Variant]:
        """Backward row blocks other than the default at this width: more rows per program share each
        layer's fixed work (weight tile, transposes, gain sums) but need more registers (compile
        report: 128 rows spill ~190 B at H = 64; at H = 128 32 rows spill ~90 B on 8 warps and ~1.4 KB on 4,
        which the H100 ran 1.35x faster than the previous default 16 x 8 all the same: now the default).
        64 rows on 4 warps at H = 64 (SASS, bf16, tanh): each warp owns 16 whole rows, so RMSNorm's row sums
        need no barrier: its layer loop issues 79 warp-instructions per row against 32 x 4's 85, with 15
        barriers per 64 rows against 26 per 32; 255 registers and 96 KB of shared memory, 2 blocks per SM
        (the H100 ran it 1.19x faster than 32 x 4: now the default; 128 x 8 runs 1 block of 128 KB per SM).
        At H = 128, 128 x 8 needs 256 KB of shared memory, more than an SM has: left out there."""
        default = choose_tiles(hidden, 64, 4, "bf16", KernelOptions())
        return [
            variant(
                f"torch + tanh, bwd {rows} rows {warps} warps",
                "torch",
                "tanh",
                (("block_m_bwd", rows), ("num_warps_bwd", warps)),
            )
            for rows, warps in ((32, 8), (32, 4), (16, 8), (64, 4), (128, 8))
            if (rows, warps) != (default.block_m_bwd, default.num_warps_bwd) and rows * hidden <= 128 * 64
        ]

    def forward_tiles(hidden: int, pairs: tuple[tuple[int, int], ...]) -> list[Variant]:
        """Forward row blocks and warps other than the default at this width, each with either sigmoid."""
        default = choose_tiles(hidden, 64, 4, "bf16", KernelOptions())
        return [
            variant(
                f"{rows} rows, {warps} warps" + (" + tanh" if sigmoid == "tanh" else ""),
                sigmoid=sigmoid,
                tiles=(("block_m", rows), ("num_warps", warps)),
            )
            for rows, warps in pairs
            if (rows, warps) != (default.block_m, default.num_warps)
            for sigmoid in ("exact", "tanh")
        ]

    # the large batches' bf16 weight copies against reading the fp32 weights in every program
    fp32_weights = {
        label: variant(f"{label} + fp32 weights", sigmoid="tanh", weight_copy_min_rows=NEVER)
        for label in ("tanh", "torch + tanh")
    }
    # the backward's registers capped (maxnreg) for more blocks per SM, at the price of spills (compile report,
    # seed model, weight copies, constexpr H: 227 -> 168 registers, 2 -> 3 blocks, 88 B spill, 5% more
    # instructions; the forward needs no cap since H became a constant: 106-124 registers, 4 blocks)
    backward_register_cap = variant("torch + tanh + bwd 168 registers", "torch", "tanh", (("max_registers_bwd", 168),))
    # the small head's gradients by their own kernel and reduction, as before the trunk backward summed them
    head_kernel = variant("torch + tanh + head kernel", "torch", "tanh", head_grads_in_trunk=False)
    # the backward's hidden weights loaded transposed into registers, as before the pipelined W [out, in] tile
    # (SASS: at H = 64 8 more barriers per layer; at H = 128 32 more, but 89 fewer local-memory accesses)
    weight_transposed = variant("torch + tanh + weight as W.T", "torch", "tanh", load_weight_once=False)
    # the forward on 2 pipeline stages and 96 registers (compile report, seed model, bf16, tanh: shared memory
    # 49 -> 33 KB and registers 106 -> 96 with 28 B of spill, so 5 blocks of 4 warps per SM instead of 4)
    forward_occupancy = variant(
        "tanh + 2 stages, 96 registers", sigmoid="tanh", tiles=(("num_stages", 2), ("max_registers", 96))
    )

    # 64 rows on 8 warps: the forward's tiles at H = 128 before the H100 ran 4 warps 1.78x faster there
    def predict(hidden: int) -> list[Variant]:
        return [
            variant("default"),
            variant("tanh", sigmoid="tanh"),
            fp32_weights["tanh"],
            *forward_tiles(hidden, ((64, 4), (64, 8), (256, 8))),
        ]

    # at H = 64 only (at H = 128 both spill 0.8-1.2 KB): 128 rows on 4 warps (compile report, bf16, tanh: 240
    # registers, 2 blocks per SM instead of 64 rows' 4, for 13% fewer loop instructions per row and half the
    # weight reads from L2 per row), and the 5-block form above
    predict_h64 = [*predict(64), forward_occupancy, *forward_tiles(64, ((128, 4),))]
    # "partials" on 128-row blocks of 8 warps, one program per SM (SASS, seed model, bf16, tanh: 81
    # warp-instructions per row and layer, its own dW product included, against "torch"'s 85 on 32 x 4; 255
    # registers, 88 B spill, 1 block per SM): a quarter of the 32-row blocks' partial load-add-stores in L2, and
    # no dz written nor batched products (0.64 ms of the 1M step on the H100). H = 64 only: 64-row blocks,
    # and 128-row blocks at H = 128, fail to compile in this form under Triton 3.6.
    wide_partials = variant(
        "partials + tanh, bwd 128 rows 8 warps",
        "partials",
        "tanh",
        (("block_m_bwd", 128), ("num_warps_bwd", 8)),
        partial_programs_per_sm=1,
    )
    train_bf16 = [
        variant("torch"),
        *partials,
        *tanh,
        head_kernel,
        weight_transposed,
        fp32_weights["torch + tanh"],
        backward_register_cap,
    ]
    # the fp32 mode's products on the FMA units instead of the tensor cores (three tf32 products each, the default)
    ieee = variant("ieee", fp32_products="ieee")
    train_fp32 = [variant("torch"), *partials, ieee]
    # "torch"'s weight-gradient products as one cuBLAS product per layer, unsplit over the batch
    no_batch_split = variant("torch, no batch split", split_k_min_rows=NEVER)
    # at H = 512 the split's partial sums read 12.6 MB of fp32 per step (6 x 2 x 512 x 512; the graphed 2,048-row
    # step's four sums: 22 us of 302 on the H100); unsplit, the products have half the output tiles (48 of
    # 256 x 128, the tiles cuBLAS chose for the split ones, for 132 SMs)
    no_batch_split_tanh = variant("layer-wise + tanh, no batch split", sigmoid="tanh", split_k_min_rows=NEVER)
    # H = 128 is the widest fused model: the layer-wise path (cuBLAS + epilogues) beside it
    layerwise = [
        variant("layer-wise", fused_max_hidden=0),
        variant("layer-wise + tanh", sigmoid="tanh", fused_max_hidden=0),
    ]
    # a large head at few rows: its vocabulary split into ranges across the SMs, or one program per row block
    vocab_ranges = [variant("vocabulary ranges"), variant("no vocabulary ranges", vocab_split_min=NEVER)]
    # the head backward kernels recompute the logits in each hidden-column program: at H = 256 twice each, on
    # 128 columns (the H100's bpe train step at 16K: 23.2 ms, ~2.9 TFLOP of head products for 1.7 needed);
    # on all 256 columns once, with twice the accumulator per program (compile report, bf16: 255 and 174
    # registers against 193 and 136, no spill, 64 KB of shared memory against 48; one 8-warp block per SM either way)
    # or as three cuBLAS products on dlogits materialised a chunk of rows at a time (head_backward "products")
    head_backward = [
        variant("torch + tanh", "torch", "tanh"),
        variant("torch + tanh + head backward on 256 columns", "torch", "tanh", (("block_hc", 256),)),
        variant("torch + tanh + head backward by products", "torch", "tanh", head_backward="products"),
    ]
    # H = 512's per-layer kernels (the graphed 2,048-row step on the H100: 7 SiLU/RMSNorm backwards at 10.5 us and
    # 7 epilogues at 5.4 us, 111 of its 302 us): 16-row blocks on 8 warps, 128 programs at 2,048 rows, one per
    # SM; on 8 rows twice the programs, or on 4 warps twice the blocks per SM
    layer_kernels = [
        variant("layer-wise + tanh", sigmoid="tanh"),
        variant("layer-wise + tanh, layer kernels on 8 rows", sigmoid="tanh", tiles=(("block_m_rowwise", 8),)),
        variant("layer-wise + tanh, layer kernels on 4 warps", sigmoid="tanh", tiles=(("num_warps", 4),)),
    ]
    # the eager 8,192- and 65,536-row steps late: the H100 ran them host-bound (1.5-2.4 ms eager against
    # 0.16 ms graphed at 8,192), so they rank candidates least well
    return [
        Step("predict", "seed", 64, 1 << 24, "bf16", predict_h64),
        Step("train", "seed", 64, 1 << 20, "bf16", [*train_bf16, wide_partials, *backward_tiles(64), no_batch_split]),
        Step("predict", "H128", 128, 1 << 22, "bf16", [*predict(128), *layerwise]),
        Step("train", "H128", 128, 1 << 19, "bf16", [*train_bf16, *backward_tiles(128), *layerwise]),
        Step("predict", "seed", 64, 1 << 24, "fp32", [variant("default"), ieee]),
        Step("train", "seed", 64, 1 << 20, "fp32", train_fp32),
        Step("train", "H128", 128, 1 << 19, "fp32", train_fp32),
        Step("train-graph", "notebook", 512, 2048, "bf16", [*layer_kernels, no_batch_split_tanh]),
        Step("train-graph", "seed", 64, 8192, "bf16", [*train_bf16, wide_partials, *backward_tiles(64)]),
        Step("train-graph", "seed", 64, 65536, "bf16", [*train_bf16, wide_partials, *backward_tiles(64)]),
        # a 2-index prompt's step, graphed (conditioning: 0.11 ms on the H100, 1.47x torch.compile): "partials"
        # forms the weight gradients in its one program, in place of two batched products over the stored dz
        Step("train-graph", "prompt", 64, 2, "bf16", tanh),
        Step("train", "bpe", 256, 16384, "bf16", head_backward, vocab=50257),
        Step("train", "bpe", 256, 64, "bf16", vocab_ranges, vocab=50257),
        Step("predict", "bpe", 256, 2048, "bf16", vocab_ranges, vocab=50257),
    ]


def make_inputs(hidden: int, batch: int, device: torch.device, layers: int = 8, vocab: int = 4):
    cfg = AUNNConfig(vocab_size=vocab, hidden=hidden, layers=layers, bits=64, residual_every=2)
    g = torch.Generator().manual_seed(0)
    # biases and gains away from their zero / one init, as the benchmark's, so that every gradient is exercised
    params = AUNNParams(*[t.detach().to(device) for t in nontrivial_model(cfg, seed=0).params])
    idx = torch.randint(0, 2**63 - 1, (batch,), generator=g, dtype=torch.int64).to(device)
    targets = torch.randint(0, cfg.vocab_size, (batch,), generator=g).to(device)
    return cfg, params, idx, targets


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def loss_grads(loss_fn, idx, targets, params: AUNNParams, cfg: AUNNConfig, precision: str):
    """The gradients of loss_fn(idx, targets, params, cfg, precision) (a loss with the options bound)."""
    p = [t.detach().requires_grad_() for t in params]
    return torch.autograd.grad(loss_fn(idx, targets, AUNNParams(*p), cfg, precision), p)


def kernels_loss(options: KernelOptions) -> Callable[..., torch.Tensor]:
    """kernels.loss with these options."""
    return lambda idx, targets, params, cfg, precision: kernels.loss(
        idx, targets, params, cfg, precision, options=options
    )


def train_error(cfg, params, idx, targets, precision: str, options: KernelOptions) -> float:
    """Largest relative gradient error over the parameters against the fp32 reference."""
    got = loss_grads(kernels_loss(options), idx, targets, params, cfg, precision)
    ref = loss_grads(reference.loss, idx, targets, params, cfg, "fp32")
    return max(_rel_err(g, r) for g, r in zip(got, ref))


def predict_error(cfg, params, idx, targets, precision: str, options: KernelOptions) -> float:
    """Relative logits error against the fp32 reference; inf when predict disagrees with its own logits."""
    with torch.no_grad():
        logits = kernels.logits(idx, params, cfg, precision, options=options)
        top2 = logits.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * logits.abs().max()
        agree = (kernels.predict(idx, params, cfg, precision, options=options) == logits.argmax(-1))[clear]
        if not bool(agree.all()):
            return float("inf")
        return _rel_err(logits, reference.logits(idx, params, cfg, "fp32"))


def predictions_differ(got: torch.Tensor, want: torch.Tensor, precision: str) -> bool:
    """Whether two candidates' predictions (int64 [N]) agree on fewer than FULL_BATCH_AGREEMENT of the rows."""
    return float((got == want).float().mean()) < FULL_BATCH_AGREEMENT


def gradients_differ(got: list[torch.Tensor], want: list[torch.Tensor], precision: str) -> bool:
    """Whether two candidates' gradients differ by more than the precision's tolerance."""
    return max(_rel_err(g, w) for g, w in zip(got, want)) > TOLERANCES[precision]


def graphed_loss_grads(
    cfg, params, idx, targets, precision: str, options: KernelOptions
) -> Callable[[], tuple[torch.Tensor, ...]]:
    """:func:`loss_grads` of kernels.loss captured in one CUDA graph (after two warm-up calls on a side
    stream, as capture requires); the returned call replays it and returns the graph's gradient tensors.
    Small training steps are host-bound when launched one kernel at a time (H = 512 at 2,048 rows: 4.5 ms
    eager against 0.33 ms graphed on the H100), so only a graph ranks their kernels."""
    p = [t.detach().requires_grad_() for t in params]

    def grads():
        return torch.autograd.grad(kernels.loss(idx, targets, AUNNParams(*p), cfg, precision, options=options), p)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            grads()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grads()

    def replay():
        graph.replay()
        return out

    return replay


# workload: (its error against the reference at CHECK_ROWS, what makes the timed call from the inputs,
# whether two calls' outputs differ); the first two take (cfg, params, idx, targets, precision, options)
WORKLOADS: dict[str, tuple[Callable[..., float], Callable[..., Callable[[], Any]], Callable[..., bool]]] = {
    "predict": (
        predict_error,
        lambda cfg, params, idx, targets, precision, options: (
            lambda: kernels.predict(idx, params, cfg, precision, options=options)
        ),
        predictions_differ,
    ),
    "train": (
        train_error,
        lambda cfg, params, idx, targets, precision, options: (
            lambda: loss_grads(kernels_loss(options), idx, targets, params, cfg, precision)
        ),
        gradients_differ,
    ),
    "train-graph": (train_error, graphed_loss_grads, gradients_differ),
}


def run(
    plan: list[Step],
    device: torch.device,
    on_row: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
    log=print,
) -> list[dict[str, Any]]:
    """Check, then time, every variant of every step; on_row(rows) after each."""
    rows: list[dict[str, Any]] = []
    for s in plan:
        error_fn, prepare, differ = WORKLOADS[s.workload]
        cfg, params, idx, targets = make_inputs(s.hidden, s.batch, device, vocab=s.vocab)
        check_n = min(s.batch, CHECK_ROWS)
        baseline = None  # (label, full-batch output) of the step's first candidate that passed its check
        for variant in s.variants:
            row = {
                "workload": s.workload,
                "shape": s.shape,
                "hidden": s.hidden,
                "vocab": s.vocab,
                "batch": s.batch,
                "precision": s.precision,
                "variant": variant.label,
                "max_rel_err": None,
                "correct": None,
                "ms": None,
                "m_idx_per_s": None,
                "error": None,
            }
            rows.append(row)
            try:
                options = variant.options
                row["max_rel_err"] = error_fn(cfg, params, idx[:check_n], targets[:check_n], s.precision, options)
                row["correct"] = row["max_rel_err"] <= TOLERANCES[s.precision]
                call = prepare(cfg, params, idx, targets, s.precision, options) if row["correct"] else None
                if call is not None and s.batch > check_n:  # and at the timed batch, beside the default
                    output = call()
                    if baseline is None:  # a copy: a graph's outputs are rewritten by its next replay
                        baseline = (
                            variant.label,
                            output.clone() if torch.is_tensor(output) else [t.clone() for t in output],
                        )
                    elif differ(output, baseline[1], s.precision):
                        row["correct"] = False
                        row["error"] = f"differs from {baseline[0]} at batch {s.batch}"
                    output = None
                if row["correct"]:
                    row["ms"] = median_ms(call, device, QUICK)
                    row["m_idx_per_s"] = s.batch / row["ms"] / 1e3
                call = None
            except Exception as exc:  # an OOM or a kernel failure loses one cell, not the run
                row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            log(
                f"{s.workload} {s.shape} H={s.hidden} batch={s.batch} {s.precision} {variant.label}: "
                f"err={row['max_rel_err']} ms={row['ms']} {row['error'] or ''}"
            )
            on_row(rows)
        params = idx = targets = None  # free this step's tensors before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# Fused kernels: candidate configurations ({meta['device']})",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, {meta['date']}. "
        "predict = forward + argmax; train = forward + loss + backward (no optimizer). "
        f"Median ms; each candidate checked against the fp32 reference at min(batch, {CHECK_ROWS}) rows "
        "first (predict: logits, train: gradients), and at a larger timed batch against the step's first "
        f"candidate (gradients within the tolerance, predictions on {FULL_BATCH_AGREEMENT:.0%} of rows).",
        "",
        "| workload | shape | H | batch | precision | variant | max rel err | ms | M idx/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = "—" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        if r["error"]:
            ms, speed = "ERROR", r["error"].replace("|", "/")
        elif r["correct"] is False:
            ms, speed = "INCORRECT", "—"
        else:
            ms, speed = f"{r['ms']:.3f}", f"{r['m_idx_per_s']:.1f}"
        lines.append(
            f"| {r['workload']} | {r['shape']} | {r['hidden']} | {r['batch']} | {r['precision']} "
            f"| {r['variant']} | {err} | {ms} | {speed} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aunn_fast.bench.kernel_variants", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, type=out_dir, help="directory for kernel_variants.md / .json")
    parser.add_argument(
        "--programs-per-sm",
        type=counts,
        default=[2],
        help="comma-separated partial_programs_per_sm values for 'partials' (default 2)",
    )
    parser.add_argument(
        "--workloads",
        type=names_from(WORKLOADS, "workload"),
        default=list(WORKLOADS),
        help="comma-separated workloads to run (default: predict,train,train-graph)",
    )
    parser.add_argument(
        "--shapes",
        type=comma_separated,
        default=None,
        help="comma-separated shapes to run: seed, notebook, H128, bpe, prompt (default: all)",
    )
    parser.add_argument(
        "--precisions",
        type=names_from(TOLERANCES, "precision"),
        default=list(TOLERANCES),
        help="comma-separated precisions to run (default: all in the plan)",
    )
    parser.add_argument(
        "--labels",
        type=lambda text: [label.strip() for label in text.split(";") if label.strip()],
        default=None,
        help="semicolon-separated candidate labels (some hold commas) to keep in "
        "each step (default: all); at the timed batch each is compared with "
        "the first one kept",
    )
    args = parser.parse_args(argv)
    plan = [
        replace(s, variants=[v for v in s.variants if args.labels is None or v.label in args.labels])
        for s in default_plan(args.programs_per_sm)
        if s.workload in args.workloads
        and s.precision in args.precisions
        and (args.shapes is None or s.shape in args.shapes)
    ]
    plan = [s for s in plan if s.variants]
    if not plan:
        parser.error("the filters leave no step to run")
    if not torch.cuda.is_available():
        print("kernel_variants: needs a CUDA GPU (torch sees none)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    reason = kernels.unavailable_reason(device)
    if reason is not None:
        print(f"kernel_variants: triton kernels unavailable: {reason}", file=sys.stderr)
        return 2
    meta = describe(device)
    args.out.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict[str, Any]]) -> None:
        (args.out / "kernel_variants.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / "kernel_variants.md").write_text(markdown(meta, rows))

    rows = run(plan, device, save)
    print(f"wrote {args.out / 'kernel_variants.md'}")
    return 0 if all(r["correct"] and not r["error"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
