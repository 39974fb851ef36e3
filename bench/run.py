"""Command line of the benchmark: ``python -m aunn_fast.bench.run`` or ``aunn bench`` (via :func:`main`).

Writes results.json, results.md and PNG plots into --out (default
bench/results/<card>-<date>/). Exit status 0, or 1 when any provider was incorrect or failed.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: bench/ on sys.path would shadow module names
    raise SystemExit("run the benchmark as a module: python -m aunn_fast.bench.run [options] (or: aunn bench)")

import argparse
import sys
import time

import torch

from aunn_fast.backends import BACKENDS
from aunn_fast.config import PRECISIONS

from . import ceilings, cpu_ceiling, environment, harness, plots, report
from .configs import CONFIGS, build_plan
from .options import names_from, out_dir, parse_sizes
from .workloads import WORKLOADS


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark every AUNN backend against PyTorch eager and torch.compile, checking correctness first.",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="seed config, two sizes per workload, short timing")
    parser.add_argument("--out", type=out_dir, help="output folder (default bench/results/<card>-<date>)")
    parser.add_argument(
        "--providers",
        type=names_from(BACKENDS, "provider(s)"),
        help="comma-separated backends (default: all in BACKENDS)",
    )
    parser.add_argument(
        "--workloads", type=names_from(WORKLOADS, "workload(s)"), help=f"comma-separated, from {', '.join(WORKLOADS)}"
    )
    parser.add_argument(
        "--configs", type=names_from(CONFIGS, "configuration(s)"), help=f"comma-separated, from {', '.join(CONFIGS)}"
    )
    parser.add_argument(
        "--precisions",
        type=names_from(PRECISIONS, "precision(s)"),
        help="comma-separated fp32,tf32,bf16 (default: fp32; on CUDA also bf16 except compile)",
    )
    parser.add_argument(
        "--batches", type=parse_sizes, help="batch sizes for predict/loss/train, e.g. 2048,64K,1M (default: the sweep)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default 0)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark with command-line arguments ``argv`` (None: sys.argv[1:]); bad arguments
    exit (status 2) before anything is created."""
    args = parse_args(argv, prog)
    device = torch.device(args.device)
    cases = build_plan(args.configs, args.workloads, device.type, args.quick, args.batches)
    options = harness.Options(device, args.providers, args.precisions, args.quick, args.seed)
    out = args.out or environment.default_out_dir(device)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    env = environment.describe(device)
    configs = {case.config_name: case.cfg for case in cases}
    defined = ceilings.applies_to(device.type, env["device"])
    cpu_rates = cpu_ceiling.measure() if device.type == "cpu" else None
    used_argv = sys.argv[1:] if argv is None else list(argv)

    def save(rows: list[harness.Row], complete: bool) -> None:
        """Write results.json and results.md (after every row, so a killed run leaves what it measured)."""
        harness.add_ratios(rows)
        ceilings.add_shares(rows, configs, defined)
        meta = report.build_meta(
            env,
            cases,
            args.quick,
            used_argv,
            time.perf_counter() - start,
            ceilings.describe(configs) if defined else ceilings.NO_CEILING,
            complete,
        )
        if cpu_rates is not None:
            cpu_ceiling.add_shares(rows, configs, cpu_rates)
            meta["cpu_ceiling"] = cpu_rates
        report.write_json(out / "results.json", meta, rows)
        report.write_markdown(out / "results.md", meta, rows)

    rows = harness.run(
        cases, options, log=lambda line: print(line, flush=True), progress=lambda rows: save(rows, complete=False)
    )
    save(rows, complete=True)
    pngs = plots.throughput(rows, out, env["device"]) + plots.ceiling_shares(rows, out, env["device"])
    wall_s = time.perf_counter() - start

    failed = [r for r in rows if r["correct"] is False]
    print(
        f"\n{len(rows)} rows ({sum(bool(r['skipped']) for r in rows)} skipped, {len(failed)} incorrect or "
        f"failed) in {wall_s:.0f} s -> {out} (results.json, results.md, {len(pngs)} PNGs)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
