"""Time the fused kernels' trunk weight-gradient candidates against each other (CUDA only).

    python -m aunn_fast.bench.kernel_variants --out DIR [--programs-per-sm 1,2,4]

For each shape (seed model H=64, 8 layers, vocab 4 at batches 8192, 65536 and 1M; H=128 at
65536), each precision (fp32, bf16) and each ``mlp_backward.WEIGHT_GRAD`` candidate, it
times forward + loss + backward (``torch.autograd.grad``, no optimizer) with
``triton.testing.do_bench`` (median ms). Every candidate's gradients are first checked
against the fp32 reference at min(batch, 65536) rows (max |g - ref| / max |ref| over each
parameter, tolerances of bench/checks.py); an incorrect candidate is not timed.
"partials" runs once per ``--programs-per-sm`` value (its persistent grid's size).
Writes DIR/kernel_variants.md and DIR/kernel_variants.json. Exit status: 0; 1 when a
candidate was incorrect or raised; 2 without CUDA.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from aunn_fast import AUNNConfig, AUNNParams, kernels, reference
from aunn_fast.params import init_params

from .checks import TOLERANCES
from .environment import describe

# (label, hidden, batch); every shape has 8 layers, vocab 4, 64 bits, a residual every 2 layers
SHAPES = [("seed", 64, 8192), ("seed", 64, 65536), ("seed", 64, 1 << 20), ("H128", 128, 65536)]
PRECISIONS = ("fp32", "bf16")
CHECK_ROWS = 65536


def make_inputs(hidden: int, batch: int, device: torch.device):
    cfg = AUNNConfig(vocab_size=4, hidden=hidden, layers=8, bits=64, residual_every=2)
    g = torch.Generator().manual_seed(0)
    # biases and gains away from their zero / one init, so that every gradient is exercised
    params = AUNNParams(*[(t if name.endswith("weight") else t + 0.1 * torch.randn(t.shape, generator=g)).to(device)
                          for name, t in zip(AUNNParams._fields, init_params(cfg, g))])
    idx = torch.randint(-2**63, 2**63 - 1, (batch,), generator=g, dtype=torch.int64).to(device)
    targets = torch.randint(0, cfg.vocab_size, (batch,), generator=g).to(device)
    return cfg, params, idx, targets


def loss_grads(loss_fn, idx, targets, params: AUNNParams, cfg: AUNNConfig, precision: str):
    p = [t.detach().requires_grad_() for t in params]
    return torch.autograd.grad(loss_fn(idx, targets, AUNNParams(*p), cfg, precision), p)


def grad_error(cfg, params, idx, targets, precision: str) -> float:
    """Largest max|g - ref| / max|ref| over the parameters, ref = fp32 reference."""
    got = loss_grads(kernels.loss, idx, targets, params, cfg, precision)
    ref = loss_grads(reference.loss, idx, targets, params, cfg, "fp32")
    return max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(got, ref))


def variants(programs_per_sm: list[int]) -> list[tuple[str, str, int | None]]:
    """(label, WEIGHT_GRAD, PARTIAL_PROGRAMS_PER_SM)."""
    out = [("torch", "torch", None)]
    for k in programs_per_sm:
        out.append(("partials" if len(programs_per_sm) == 1 else f"partials x{k}/SM", "partials", k))
    return out


def run(programs_per_sm: list[int], device: torch.device, log=print) -> list[dict[str, Any]]:
    from triton.testing import do_bench

    from aunn_fast.kernels import mlp_backward

    saved = mlp_backward.WEIGHT_GRAD, mlp_backward.PARTIAL_PROGRAMS_PER_SM
    rows: list[dict[str, Any]] = []
    try:
        for shape, hidden, batch in SHAPES:
            cfg, params, idx, targets = make_inputs(hidden, batch, device)
            check_n = min(batch, CHECK_ROWS)
            for precision in PRECISIONS:
                for label, weight_grad, per_sm in variants(programs_per_sm):
                    row = {"shape": shape, "hidden": hidden, "batch": batch, "precision": precision,
                           "variant": label, "max_rel_err": None, "correct": None, "ms": None,
                           "m_idx_per_s": None, "error": None}
                    rows.append(row)
                    mlp_backward.WEIGHT_GRAD = weight_grad
                    if per_sm is not None:
                        mlp_backward.PARTIAL_PROGRAMS_PER_SM = per_sm
                    try:
                        row["max_rel_err"] = grad_error(cfg, params, idx[:check_n], targets[:check_n], precision)
                        row["correct"] = row["max_rel_err"] <= TOLERANCES[precision]
                        if row["correct"]:
                            row["ms"] = float(do_bench(
                                lambda: loss_grads(kernels.loss, idx, targets, params, cfg, precision),
                                warmup=10, rep=50, return_mode="median"))
                            row["m_idx_per_s"] = batch / row["ms"] / 1e3
                    except Exception as exc:  # an OOM or a kernel failure loses one cell, not the run
                        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    log(f"{shape} H={hidden} batch={batch} {precision} {label}: "
                        f"err={row['max_rel_err']} ms={row['ms']} {row['error'] or ''}")
            params = idx = targets = None  # free this shape's tensors before the next one
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        mlp_backward.WEIGHT_GRAD, mlp_backward.PARTIAL_PROGRAMS_PER_SM = saved
    return rows


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# Fused backward: trunk weight-gradient candidates ({meta['device']})", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, {meta['date']}. "
             "Forward + loss + backward (no optimizer), do_bench median; gradients checked against "
             f"the fp32 reference at min(batch, {CHECK_ROWS}) rows first.", "",
             "| shape | H | batch | precision | variant | max rel err | ms | M idx/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "—" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        if r["error"]:
            ms, speed = "ERROR", r["error"].replace("|", "/")
        elif r["correct"] is False:
            ms, speed = "INCORRECT", "—"
        else:
            ms, speed = f"{r['ms']:.3f}", f"{r['m_idx_per_s']:.1f}"
        lines.append(f"| {r['shape']} | {r['hidden']} | {r['batch']} | {r['precision']} | {r['variant']} "
                     f"| {err} | {ms} | {speed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aunn_fast.bench.kernel_variants", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for kernel_variants.md / .json")
    parser.add_argument("--programs-per-sm", default="2",
                        help="comma-separated PARTIAL_PROGRAMS_PER_SM values for 'partials' (default 2)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_variants: needs a CUDA GPU (torch sees none)", file=sys.stderr)
        return 2
    reason = kernels.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        print(f"kernel_variants: triton kernels unavailable: {reason}", file=sys.stderr)
        return 2
    per_sm = [int(x) for x in args.programs_per_sm.split(",") if x.strip()]
    meta = describe(torch.device("cuda"))
    rows = run(per_sm, torch.device("cuda"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_variants.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "kernel_variants.md").write_text(markdown(meta, rows))
    print(f"wrote {args.out / 'kernel_variants.md'}")
    return 0 if all(r["correct"] and not r["error"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
