"""PNG plots of a run: throughput against batch size, and share of the H100 ceilings."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .harness import Row  # noqa: E402


def _series(rows: list[Row], value: str) -> dict[str, tuple[list[int], list[float]]]:
    """provider/precision -> (batches, values), from rows that ran correctly."""
    lines: dict[str, tuple[list[int], list[float]]] = {}
    for row in sorted(rows, key=lambda r: r["batch"]):
        if row["correct"] and row.get(value):
            xs, ys = lines.setdefault(f"{row['provider']}/{row['precision']}", ([], []))
            xs.append(row["batch"])
            ys.append(row[value])
    return lines


def _draw(ax: plt.Axes, rows: list[Row], value: str, title: str, ylabel: str) -> None:
    for label, (xs, ys) in _series(rows, value).items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("batch (indices)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _grid(count: int) -> tuple[plt.Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(1, count, figsize=(5 * count, 4), squeeze=False)
    return fig, list(axes[0])


def throughput(rows: list[Row], out_dir: Path, device: str) -> list[Path]:
    """throughput_<workload>.png: indices/s against batch, one panel per config, log-log."""
    paths = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == workload]
        configs = list(dict.fromkeys(r["config"] for r in mine))
        fig, axes = _grid(len(configs))
        for ax, config in zip(axes, configs):
            _draw(ax, [r for r in mine if r["config"] == config], "items_per_s", f"{workload}, {config}", "indices / s")
        fig.suptitle(f"{workload} throughput on {device}")
        fig.tight_layout()
        paths.append(out_dir / f"throughput_{workload}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def ceiling_shares(rows: list[Row], out_dir: Path, device: str) -> list[Path]:
    """ceiling_share.png: fraction of the SFU and tensor-core ceilings reached, per workload
    with a ceiling (top row SFU, bottom row tensor cores); nothing when no row has a share."""
    rows = [r for r in rows if r.get("sfu_share")]
    if not rows:
        return []
    keys = list(dict.fromkeys((r["workload"], r["config"]) for r in rows))
    fig, axes = plt.subplots(2, len(keys), figsize=(5 * len(keys), 8), squeeze=False)
    for column, (workload, config) in enumerate(keys):
        mine = [r for r in rows if r["workload"] == workload and r["config"] == config]
        _draw(axes[0][column], mine, "sfu_share", f"{workload}, {config}: SFU ceiling", "share of ceiling")
        _draw(
            axes[1][column], mine, "tensor_core_share", f"{workload}, {config}: tensor-core ceiling", "share of ceiling"
        )
    fig.suptitle(f"share of the H100 ceilings on {device}")
    fig.tight_layout()
    path = out_dir / "ceiling_share.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
