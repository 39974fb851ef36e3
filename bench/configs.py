"""What to run: the named model configurations and their batch sweeps.

A :class:`Case` is one (configuration, workload, batches) cell of the plan; the
harness runs every provider and precision on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from aunn_fast import AUNNConfig

from .workloads import WORKLOADS

CONFIGS: dict[str, AUNNConfig] = {
    "seed": AUNNConfig(vocab_size=4, hidden=64, layers=8, bits=64),
    "notebook": AUNNConfig(vocab_size=4, hidden=512, layers=8, bits=64),
    "bytes": AUNNConfig(vocab_size=256, hidden=128, layers=8, bits=64),
    "bpe": AUNNConfig(vocab_size=50_257, hidden=256, layers=8, bits=64),
}

K, M = 1024, 1024 * 1024

# Batch sweeps by device type, then configuration, then workload. Workloads with a
# fixed batch (condition, seed-run) define it themselves; sizes that would not fit
# in device memory are skipped at run time with the reason.
SWEEPS: dict[str, dict[str, dict[str, tuple[int, ...]]]] = {
    "cuda": {
        "seed": {
            "predict": (1, 2 * K, 8 * K, 64 * K, M, 16 * M),
            "loss": (2 * K, 64 * K, M, 16 * M),
            "train": (2 * K, 8 * K, 64 * K, M, 4 * M),
        },
        "notebook": {
            "predict": (2 * K, 64 * K, M, 4 * M),
            "loss": (2 * K, 64 * K, M),
            "train": (2 * K, 64 * K, 256 * K),
        },
        "bytes": {"predict": (2 * K, 64 * K, M, 4 * M), "loss": (2 * K, 64 * K, M), "train": (2 * K, 64 * K, M)},
        "bpe": {"predict": (2 * K, 16 * K, 64 * K), "loss": (2 * K, 16 * K), "train": (2 * K, 16 * K)},
    },
    "cpu": {
        "seed": {"predict": (1, 2 * K, 8 * K, 64 * K), "loss": (2 * K, 64 * K), "train": (2 * K, 8 * K, 64 * K)},
        "notebook": {"predict": (2 * K, 8 * K), "loss": (2 * K,), "train": (2 * K, 8 * K)},
        "bytes": {"predict": (2 * K, 8 * K), "loss": (2 * K,), "train": (2 * K, 8 * K)},
        "bpe": {"predict": (256, 2 * K), "loss": (256,), "train": (256, 2 * K)},
    },
}

# --quick: the seed configuration only, a couple of sizes each (torch.compile compiles once
# per shape, ~10-20 s each on two CPU cores, so shapes are kept few). On CUDA the sizes of
# the fused-kernel issue's goals: predict at 16M, train steps at 8,192 and 1M.
QUICK_CONFIGS = ("seed",)
QUICK_SWEEPS: dict[str, dict[str, tuple[int, ...]]] = {
    "cuda": {"predict": (16 * M,), "loss": (M,), "train": (8 * K, M)},
    "cpu": {"predict": (2 * K, 8 * K), "loss": (8 * K,), "train": (2 * K, 8 * K)},
}


@dataclass(frozen=True)
class Case:
    """One configuration and workload with the batch sizes to run it at."""

    config_name: str
    cfg: AUNNConfig
    workload: str
    batches: tuple[int, ...]


def batches_for(config_name: str, workload: str, device_type: str, quick: bool) -> tuple[int, ...]:
    """Default batch sizes for a named configuration and workload on a device type ("cpu"/"cuda")."""
    fixed = WORKLOADS[workload].fixed_batches
    if fixed:
        return fixed
    sweep = WORKLOADS[workload].sweep or workload
    if quick:
        return QUICK_SWEEPS[device_type][sweep]
    return SWEEPS[device_type][config_name][sweep]


def build_plan(
    config_names: list[str] | None,
    workloads: list[str] | None,
    device_type: str,
    quick: bool,
    batches: tuple[int, ...] | None = None,
) -> list[Case]:
    """The cases to run. None selects the defaults (all, or the quick subset of configurations);
    ``batches`` overrides the sweep of every workload without a fixed batch."""
    names = config_names or list(QUICK_CONFIGS if quick else CONFIGS)
    for name in names:
        if name not in CONFIGS:
            raise ValueError(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
    chosen = workloads or list(WORKLOADS)
    for workload in chosen:
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    cases = []
    for name in names:
        for workload in chosen:
            sizes = batches if batches and not WORKLOADS[workload].fixed_batches else None
            cases.append(Case(name, CONFIGS[name], workload, sizes or batches_for(name, workload, device_type, quick)))
    return cases
