"""The CPU's ceiling, measured in the same run: its fp32 and bf16 matrix-product rates, and each row's share.

A CPU has no datasheet figure the suite can trust (clocks, cores and the load of a shared machine vary), so
the rate is measured at the start of the run: the best of a few ``torch.mm`` of two SIZE x SIZE matrices
(MKL / oneDNN on all of torch's threads; bf16 uses AMX or AVX512-BF16). On a CPU without bf16 instructions
bf16 is not measured: oneDNN emulates it there (a 1024 x 1024 product took ~0.5 s on a 2-core AMD EPYC, ~25 s
a run), no backend runs bf16 faster than fp32 there, and its rows get no share. A row's share is its rate in
FLOP/s (``ceilings.forward_flops`` per index, x3 for a training step) over that ceiling.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from aunn_fast import AUNNConfig

from .ceilings import FLOP_FACTOR, forward_flops
from .workloads import WORKLOADS

SIZE = 1024
REPEATS = 10
WARMUP_S = 0.5  # of products before timing: the first idle-machine run measured 2/3 of later ones without it
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_flops(dtype: torch.dtype, size: int = SIZE, repeats: int = REPEATS) -> float:
    """The best FLOP/s of ``repeats`` products of two size x size matrices of ``dtype`` on the CPU."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    warm_until = time.perf_counter() + WARMUP_S  # oneDNN's first call builds its kernel; a resting core clocks up
    while time.perf_counter() < warm_until:
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def has_bf16_instructions() -> bool:
    """Whether the CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX tiles)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def measure() -> dict[str, Any]:
    """results.json's meta.cpu_ceiling: FLOP/s per precision measured and how they were measured."""
    measured = [name for name in PRECISION_DTYPES if name != "bf16" or has_bf16_instructions()]
    skipped = "" if "bf16" in measured else "; bf16 not measured: this CPU has no bf16 instructions"
    return {
        "flops": {name: matmul_flops(PRECISION_DTYPES[name]) for name in measured},
        "source": f"best of {REPEATS} torch.mm of {SIZE} x {SIZE} per dtype after {WARMUP_S} s of them, on "
        f"{torch.get_num_threads()} threads, measured at the start of this run{skipped}",
    }


def add_shares(rows: list[dict[str, Any]], configs: dict[str, AUNNConfig], measured: dict[str, Any]) -> None:
    """Set each row's ``matmul_share``: its FLOP/s over the measured rate of its precision (None where the row
    has no speed, its workload no FLOP count, or its precision no measured rate)."""
    for row in rows:
        kind = WORKLOADS[row["workload"]].ceiling
        rate = measured["flops"].get(row["precision"])
        if kind and rate and row["items_per_s"]:
            row["matmul_share"] = row["items_per_s"] * forward_flops(configs[row["config"]]) * FLOP_FACTOR[kind] / rate
        else:
            row["matmul_share"] = None


def summary(measured: dict[str, Any]) -> str:
    """One line for results.md."""
    rates = ", ".join(f"{name} {flops / 1e9:.1f} GFLOP/s" for name, flops in measured["flops"].items())
    return f"CPU matrix products: {rates} ({measured['source']})"
