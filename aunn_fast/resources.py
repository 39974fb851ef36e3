"""Memory estimates, checked before anything is allocated: a request the machine cannot hold is refused
with the numbers (what it needs, what is available) instead of an allocator traceback minutes later.

The estimates are lower bounds (parameters and the tensors a step cannot do without), so a refusal is
certain to be right; a request that passes can still run out of memory near the limit.
"""

from __future__ import annotations

import os

import torch

from .config import AUNNConfig
from .errors import ResourceError
from .params import param_shapes

FLOAT32_BYTES = 4
INDEX_BYTES = 8
TRAINING_COPIES = 4  # parameters, gradients and AdamW's two moments, all float32


def parameter_count(cfg: AUNNConfig) -> int:
    """Number of float32 parameters of a model of this config (exact, in Python integers: never overflows)."""
    total = 0
    for shape in param_shapes(cfg).values():
        count = 1
        for size in shape:
            count *= size
        total += count
    return total


def model_bytes(cfg: AUNNConfig) -> int:
    """Bytes of the float32 parameters."""
    return FLOAT32_BYTES * parameter_count(cfg)


def training_bytes(cfg: AUNNConfig, batch_size: int) -> int:
    """A lower bound of a training step's memory: parameters, gradients and AdamW's moments, plus one
    float32 activation per hidden unit and layer and one logit per token for each index of the batch."""
    activations = batch_size * (cfg.hidden * (cfg.layers - 1) + cfg.vocab_size) * FLOAT32_BYTES
    return TRAINING_COPIES * model_bytes(cfg) + activations + batch_size * 2 * INDEX_BYTES


def available_bytes(device: torch.device | str) -> int | None:
    """Memory that can still be allocated on device: free CUDA memory, or on the host the kernel's
    MemAvailable (capped by a cgroup's limit); None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    return _host_available()


def _host_available() -> int | None:
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    limit = _cgroup_room()
    return available if limit is None or available is None else min(available, limit)


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, if it has one."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def format_bytes(count: int) -> str:
    """A byte count for people: '3.4 GB', '800 TB' (decimal units), with the exact count for small ones."""
    for unit, size in (("EB", 10**18), ("PB", 10**15), ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count} bytes"


def check_fits(what: str, needed: int, device: torch.device | str) -> None:
    """ResourceError naming ``what`` and both figures when ``needed`` bytes exceed what device has available."""
    available = available_bytes(device)
    if available is not None and needed > available:
        raise ResourceError(
            f"{what} needs at least {format_bytes(needed)} of memory, but {torch.device(device)} "
            f"has {format_bytes(available)} available"
        )


def check_model_fits(cfg: AUNNConfig, device: torch.device | str, batch_size: int | None = None) -> None:
    """ResourceError unless the model's parameters (and, with batch_size, a training step) fit on device."""
    count = parameter_count(cfg)
    shape = f"a model of hidden={cfg.hidden}, layers={cfg.layers}, vocab_size={cfg.vocab_size} ({count:,} parameters)"
    if batch_size is None:
        check_fits(shape, model_bytes(cfg), device)
    else:
        check_fits(f"training {shape} on batches of {batch_size:,}", training_bytes(cfg, batch_size), device)
