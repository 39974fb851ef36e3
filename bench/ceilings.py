"""Hardware ceilings for the fast paths, as documented constants (NVIDIA H100 SXM).

Source: the H100 SXM datasheet (clock, SMs, special-function and tensor-core rates), as the
project's first estimates of the limits at H=64 used them. Two ceilings, in indices per second:

* special-function unit (SFU): each SiLU costs an exp and a reciprocal on the SFU,
  16 ops/clock/SM x 132 SMs x 1.98 GHz. Forward does 2 * H * (L-1) such ops per
  index (the input layer and L-2 hidden layers), train twice that. At H=64, L=8
  this gives ~4.7 G idx/s forward and ~2.3 G idx/s train.
* tensor cores: forward FLOPs per index ~ 2 * (bits*H + (L-2)*H*H + H*V), train
  ~ 3x forward, at 989 TFLOP/s dense bf16 (the limit for every precision: it is
  the fastest any of them can go).

Ceilings are defined only for CUDA runs on H100-class cards (H100, H200, GH200: same
SM count and clocks); for anything else, including CPU, none is defined.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from aunn_fast import AUNNConfig

from .workloads import WORKLOADS

H100_SFU_OPS_PER_S = 16 * 132 * 1.98e9
H100_BF16_DENSE_FLOPS = 989e12
SFU_OPS_PER_SILU = 2  # exp + reciprocal
FLOP_FACTOR = {"forward": 1, "train": 3}  # backward ~ 2x forward
SFU_FACTOR = {"forward": 1, "train": 2}  # SiLU forward + its derivative
H100_CLASS = ("H100", "H200", "GH200")
NO_CEILING = "no ceiling is defined for this device (ceilings are H100-class CUDA only)"


@dataclass(frozen=True)
class Ceilings:
    """Indices per second the SFU and the tensor cores allow for one config and kind ("forward"/"train")."""

    sfu: float
    tensor_core: float


def applies_to(device_type: str, device_name: str) -> bool:
    """True for CUDA runs on an H100-class card."""
    return device_type == "cuda" and any(tag in device_name for tag in H100_CLASS)


def forward_flops(cfg: AUNNConfig) -> float:
    """FLOPs per index of one forward pass (matrix products only)."""
    h = cfg.hidden
    return 2.0 * (cfg.bits * h + cfg.hidden_layers * h * h + h * cfg.vocab_size)


def ceilings(cfg: AUNNConfig, kind: str) -> Ceilings:
    """H100 ceilings in indices/s for ``kind`` "forward" or "train"."""
    sfu_ops = SFU_OPS_PER_SILU * cfg.hidden * (cfg.layers - 1) * SFU_FACTOR[kind]
    return Ceilings(
        sfu=H100_SFU_OPS_PER_S / sfu_ops, tensor_core=H100_BF16_DENSE_FLOPS / (forward_flops(cfg) * FLOP_FACTOR[kind])
    )


def describe(configs: dict[str, AUNNConfig]) -> dict[str, Any]:
    """results.json's meta.ceilings: constants, source, and indices/s per config and kind."""
    return {
        "source": "the H100 SXM datasheet; see aunn_fast/bench/ceilings.py",
        "sfu_ops_per_s": H100_SFU_OPS_PER_S,
        "tensor_core_flops": H100_BF16_DENSE_FLOPS,
        "idx_per_s": {
            name: {kind: asdict(ceilings(cfg, kind)) for kind in FLOP_FACTOR} for name, cfg in configs.items()
        },
    }


def summary(meta_ceilings: dict[str, Any] | str) -> str:
    """One line for results.md."""
    if isinstance(meta_ceilings, str):
        return meta_ceilings
    parts = [
        f"{name} {kind}: SFU {c['sfu'] / 1e9:.2f}, tensor cores {c['tensor_core'] / 1e9:.2f} G idx/s"
        for name, kinds in meta_ceilings["idx_per_s"].items()
        for kind, c in kinds.items()
    ]
    return f"H100 ({meta_ceilings['source']}): " + "; ".join(parts)


def add_shares(rows: list[dict[str, Any]], configs: dict[str, AUNNConfig], defined: bool) -> None:
    """Set each row's sfu_share and tensor_core_share (items_per_s / ceiling), or None where
    no ceiling is defined (device, workload without a ceiling, or no speed)."""
    for row in rows:
        kind = WORKLOADS[row["workload"]].ceiling
        limits = ceilings(configs[row["config"]], kind) if defined and kind and row["items_per_s"] else None
        row["sfu_share"] = limits and row["items_per_s"] / limits.sfu
        row["tensor_core_share"] = limits and row["items_per_s"] / limits.tensor_core
