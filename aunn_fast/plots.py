"""PNG plots for ``aunn eval`` and ``aunn demo`` (matplotlib, headless)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from .data import Vocab  # noqa: E402


def loss_curve(rows: list[dict[str, float]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    loss_line, = ax.plot(steps, [r["loss"] for r in rows], label="loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    twin = ax.twinx()
    accuracy_line, = twin.plot(steps, [r["accuracy"] for r in rows], color="tab:orange", label="batch accuracy")
    twin.set_ylabel("batch accuracy")
    twin.set_ylim(0, 1.02)
    ax.set_title("Training loss and accuracy")
    ax.legend(handles=[loss_line, accuracy_line], loc="center right")
    _save(fig, path)


def token_strips(strips: dict[str, torch.Tensor], start: int, vocab: Vocab, title: str,
                 path: Path, marker: int | None = None) -> None:
    """One coloured row of tokens per strip over indices start..; a negative token is left blank.

    Strips are int64 [width] each; ``marker`` draws a vertical line before that index. Colours tell up to
    20 tokens apart; a character vocabulary of at most 10 gets a legend.
    """
    names = list(strips)
    grid = np.stack([strips[n].cpu().numpy() for n in names]).astype(float)
    grid[grid < 0] = np.nan
    vocab_size = len(vocab) if isinstance(vocab, list) else int(np.nanmax(grid)) + 1
    colors = plt.get_cmap("tab10" if vocab_size <= 10 else "tab20").colors[:max(vocab_size, 2)]
    cmap = ListedColormap(colors).with_extremes(bad="white")
    width = grid.shape[1]
    # A float64 axis cannot tell indices apart past 2**53: there it counts from start instead.
    origin = start if start + width > 2**53 else 0
    fig, ax = plt.subplots(figsize=(min(16, 8 + width / 50), 1.5 + 0.4 * len(names)))
    ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5, interpolation="nearest",
              extent=(start - origin - 0.5, start - origin + width - 0.5, len(names) - 0.5, -0.5))
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(f"index - {origin:,}" if origin else "index")
    if marker is not None:
        ax.axvline(marker - origin - 0.5, color="black", linewidth=2)
    if isinstance(vocab, list) and len(vocab) <= 10:
        handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(vocab))]
        ax.legend(handles, [repr(t) for t in vocab], loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(title)
    _save(fig, path)


def histogram(hist: dict[str, dict[str, float]], path: Path, predictions: int,
              other: dict[str, float] | None = None) -> None:
    """Bars of each named token's training and predicted fraction (of ``predictions`` after the data), and one
    for ``other`` (the rest summed)."""
    labels = [repr(t) for t in hist]
    bars = list(hist.values())
    if other is not None:
        labels.append(f"{other['tokens']:,} others")
        bars.append(other)
    x = np.arange(len(bars))
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(bars)), 4))
    ax.bar(x - 0.2, [b["training"] for b in bars], width=0.4, label="training data")
    ax.bar(x + 0.2, [b["predicted"] for b in bars], width=0.4, label="predicted past the data")
    ax.set_xticks(x, labels, rotation=90 if len(bars) > 12 else 0)
    ax.set_ylabel("fraction of tokens")
    ax.set_title(f"Token histogram: training data vs {predictions:,} predictions after the data")
    ax.legend()
    _save(fig, path)


def extrapolation(bins: dict[str, Any], path: Path) -> None:
    names = [n for n in bins if n != "chance_uniform"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, [bins[n] for n in names])
    ax.axhline(bins["chance_uniform"], color="red", linestyle="--", label="chance (uniform guesses)")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of valid |xxx chunks")
    ax.set_xlabel("window past the end of the data")
    ax.set_title("Extrapolation: structure of predicted chunks")
    ax.legend()
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    with warnings.catch_warnings():  # a token the font cannot draw (e.g. CJK in DejaVu Sans) is drawn as a box
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
