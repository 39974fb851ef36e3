"""Timers. CUDA: device events (``triton.testing.do_bench`` medians when triton imports);
CPU: medians of ``time.perf_counter`` over repeated calls. All results in milliseconds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Budget:
    """How long to sample: at least ``min_reps`` calls and ``min_ms`` of them (CPU, event loop),
    at most ``max_reps``; ``warmup_ms``/``rep_ms`` are do_bench's; ``stretch_steps`` for seed-run."""

    min_reps: int
    max_reps: int
    min_ms: float
    warmup_ms: int
    rep_ms: int
    stretch_steps: int


QUICK = Budget(min_reps=3, max_reps=20, min_ms=200.0, warmup_ms=10, rep_ms=40, stretch_steps=20)
FULL = Budget(min_reps=5, max_reps=200, min_ms=1000.0, warmup_ms=25, rep_ms=100, stretch_steps=100)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_s(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one synchronized call: used for the first call (compile/JIT time included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _cpu_median_ms(fn: Callable[[], object], budget: Budget) -> float:
    fn()  # one untimed warm-up call
    samples: list[float] = []
    while len(samples) < budget.max_reps and (len(samples) < budget.min_reps or sum(samples) < budget.min_ms):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _event_median_ms(fn: Callable[[], object], budget: Budget) -> float:
    for _ in range(3):
        fn()
    samples: list[float] = []
    while len(samples) < budget.max_reps and (len(samples) < budget.min_reps or sum(samples) < budget.min_ms):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def median_ms(fn: Callable[[], object], device: torch.device, budget: Budget) -> float:
    """Median milliseconds of one call of ``fn`` after warm-up."""
    if device.type != "cuda":
        return _cpu_median_ms(fn, budget)
    try:
        from triton.testing import do_bench
    except ImportError:
        return _event_median_ms(fn, budget)
    return float(do_bench(fn, warmup=budget.warmup_ms, rep=budget.rep_ms, return_mode="median"))


def latency_ms(fn: Callable[[], object], device: torch.device, budget: Budget) -> float:
    """Median wall-clock milliseconds of one synchronized call (host time and launch gaps included): what a
    user waiting for the result sees. On CPU the same as :func:`median_ms`."""
    if device.type != "cuda":
        return _cpu_median_ms(fn, budget)
    return _cpu_median_ms(lambda: (fn(), synchronize(device)), budget)


def stretch_ms(fn: Callable[[], object], device: torch.device, steps: int) -> float:
    """Milliseconds per call over ``steps`` back-to-back calls, as a training loop runs them."""
    for _ in range(3):
        fn()
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps
    start_s = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start_s) * 1e3 / steps
