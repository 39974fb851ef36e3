"""Where a workload's time goes: torch.profiler over a few calls, operator by operator, kernel by kernel.

    python -m aunn_fast.bench.profile_step --config seed --workloads train,predict --batches 8192,16M --out DIR

For each --workload/--batch pair, writes into DIR ``profile_<config>_<workload>_<batch>_<provider>_<precision>``:
``.txt``, the operators and kernels sorted by self device time (CPU time on a CPU), headed by the
environment and the mean wall time per call; and ``.json``, a Chrome trace of the same calls
(chrome://tracing or ui.perfetto.dev). A goal the benchmark shows missed is explained from these:
which launch dominates, and how much of a step is host overhead between launches.

With ``--no-profiler`` the same warm-up and calls run with no profiler attached and nothing is written
but the wall time per call: a target for an outside profiler (``ncu``, which cannot share CUPTI with
torch.profiler; see bench/gpu_check.sh), with the workload's launches in a known order.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from aunn_fast import AUNN
from aunn_fast.backends import BACKENDS
from aunn_fast.bench import environment, timing
from aunn_fast.bench.configs import CONFIGS
from aunn_fast.bench.options import out_dir, parse_sizes
from aunn_fast.bench.workloads import WORKLOADS
from aunn_fast.config import PRECISIONS

WARMUP_CALLS = 5
TABLE_ROWS = 25


def warmed_up_step(
    config: str, workload: str, batch: int, provider: str, precision: str, device: torch.device, seed: int = 0
) -> Callable[[], object]:
    """A workload's step, prepared and called WARMUP_CALLS times."""
    model = AUNN(CONFIGS[config], backend=provider, precision=precision, seed=seed).to(device)
    model.validate = False  # as in the benchmark: no range checks (a device sync each) in the step
    generator = torch.Generator(device=device).manual_seed(seed)
    step = WORKLOADS[workload].prepare(model, batch, generator).step
    for _ in range(WARMUP_CALLS):
        step()
    timing.synchronize(device)
    return step


def timed_calls(step: Callable[[], object], calls: int, device: torch.device) -> float:
    """Mean wall time of ``calls`` calls in ms, the device synchronized at the end."""
    start = time.perf_counter()
    for _ in range(calls):
        step()
    timing.synchronize(device)
    return (time.perf_counter() - start) * 1e3 / calls


def profile_workload(
    config: str,
    workload: str,
    batch: int,
    provider: str,
    precision: str,
    calls: int,
    device: torch.device,
    seed: int = 0,
) -> tuple[str, profile]:
    """Profile ``calls`` calls of a workload after warm-up; returns (report text, the profiler)."""
    step = warmed_up_step(config, workload, batch, provider, precision, device, seed)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall_ms = timed_calls(step, calls, device)
    env = environment.describe(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    header = (
        f"{config} {CONFIGS[config]}, workload {workload}, batch {batch:,}, provider {provider}, "
        f"precision {precision}\n{env['device']}, torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['commit']}, {env['date']}\n{calls} calls after {WARMUP_CALLS} warm-up calls: "
        f"{wall_ms:.3f} ms per call wall time (profiler overhead included); sorted by {sort_by}\n\n"
    )
    return header + prof.key_averages().table(sort_by=sort_by, row_limit=TABLE_ROWS), prof


def _pairs(workloads: str, batches: str) -> list[tuple[str, int]]:
    """(workload, batch) pairs from "train,predict" and "8192,16M" (sizes parsed as the benchmark's --batches)."""
    names = [w.strip() for w in workloads.split(",") if w.strip()]
    sizes = parse_sizes(batches)
    if len(names) != len(sizes):
        raise argparse.ArgumentTypeError("--workloads and --batches pair up: give as many of each")
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}"
        )
    return list(zip(names, sizes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=tuple(CONFIGS), default="seed")
    parser.add_argument("--workloads", default="train", help="comma-separated, paired with --batches")
    parser.add_argument(
        "--batches", default="8192", help="comma-separated batch sizes (K, M suffixes), one per workload"
    )
    parser.add_argument("--provider", choices=tuple(BACKENDS), default="triton")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--calls", type=int, default=20, help="profiled calls (default 20)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=out_dir, help="directory for the reports (required unless --no-profiler)")
    parser.add_argument(
        "--no-profiler",
        action="store_true",
        help="run the warm-up and calls unprofiled, for an outside profiler; write nothing",
    )
    args = parser.parse_args(argv)
    try:
        pairs = _pairs(args.workloads, args.batches)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    if args.out is None and not args.no_profiler:
        parser.error("--out is required (unless --no-profiler)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    cuda_only = [workload for workload, _ in pairs if WORKLOADS[workload].cuda_only]
    if cuda_only and args.device != "cuda":
        parser.error(f"{', '.join(cuda_only)} run(s) on CUDA only")
    device = torch.device(args.device)
    reason = BACKENDS[args.provider].unavailable_reason(device)
    if reason is not None:
        parser.error(f"provider {args.provider} is unavailable on {device}: {reason}")
    for workload, batch in pairs:
        if args.no_profiler:
            step = warmed_up_step(args.config, workload, batch, args.provider, args.precision, device)
            print(
                f"{workload} at {batch:,}: {timed_calls(step, args.calls, device):.3f} ms per call "
                f"({args.calls} calls after {WARMUP_CALLS} warm-up calls, no profiler)",
                flush=True,
            )
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        text, prof = profile_workload(args.config, workload, batch, args.provider, args.precision, args.calls, device)
        stem = args.out / f"profile_{args.config}_{workload}_{batch}_{args.provider}_{args.precision}"
        stem.with_suffix(".txt").write_text(text + "\n")
        prof.export_chrome_trace(str(stem.with_suffix(".json")))
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
