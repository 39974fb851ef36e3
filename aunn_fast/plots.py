"""PNG plots for ``aunn eval`` and ``aunn demo`` (matplotlib, headless).

Tokens are shown as text wherever a plot shows them, so that a plot reads for any vocabulary: a character
vocabulary as its characters (space, newline and tab as ·, ↵ and →; characters the font cannot draw as
Python escapes), raw bytes as ASCII or ``\\xNN`` escapes, token ids as numbers.
"""

from __future__ import annotations

import functools
import textwrap
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.ft2font import FT2Font  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

from .data import Vocab  # noqa: E402

DPI = 110
FONT_SIZE = 10  # points, the token panels' monospace text
CHAR_WIDTH = 0.62 * FONT_SIZE  # points per character cell (DejaVu Sans Mono advances 0.602 em)
LINE_HEIGHT = 1.5 * FONT_SIZE  # points per panel line
LINE_CHARS = 64  # character cells of tokens per panel line
HISTOGRAM_BARS = 30  # tokens the histogram plot names; the rest are summed in one "other" bar
WHITESPACE = {" ": "·", "\n": "↵", "\t": "→"}
WHITESPACE_NAMES = {" ": "space", "\n": "newline", "\t": "tab"}
DIFFERS = "tab:red"


# -- how tokens read ----------------------------------------------------------------------------------


@functools.cache
def _monospace_font() -> FT2Font:
    return FT2Font(font_manager.findfont(font_manager.FontProperties(family="monospace")))


def _escaped(ch: str) -> str:
    """ch itself if it is printable and the plots' font can draw it, else its Python escape (\\x1b, \\u4e00)."""
    if ch.isprintable() and _monospace_font().get_char_index(ord(ch)) != 0:
        return ch
    return ch.encode("unicode_escape").decode("ascii")


def char_label(ch: str) -> str:
    """How one character reads in a token panel: space, newline and tab as ·, ↵ and →, else :func:`_escaped`."""
    return WHITESPACE.get(ch) or _escaped(ch)


def token_labels(vocab: Vocab, vocab_size: int) -> list[str]:
    """Each token id's label in a token panel, for ids 0..vocab_size-1: a character vocabulary's characters
    (:func:`char_label`), bytes (vocab None) as ASCII characters or ``\\xNN``, token ids (an int vocab) as
    numbers."""
    if isinstance(vocab, list):
        return [char_label(ch) for ch in vocab]
    if vocab is None:
        return [char_label(chr(b)) if b < 0x7F else f"\\x{b:02x}" for b in range(vocab_size)]
    return [str(i) for i in range(vocab_size)]


def histogram_label(name: str, vocab: Vocab) -> str:
    """A histogram entry's label from its name in metrics.json: ids as they are, one character quoted
    (escaped where unprintable or not in the font), anything else (a byte's 0xNN name) as it is."""
    if isinstance(vocab, int) or len(name) != 1:
        return name
    return f"'{_escaped(name)}'"


def tokens_per_line(vocab: Vocab) -> int:
    """How many tokens a panel line holds (without escapes): LINE_CHARS characters, or ids with a space each."""
    if isinstance(vocab, int):
        return LINE_CHARS // (len(str(max(vocab - 1, 0))) + 1)
    return LINE_CHARS


# -- plots -------------------------------------------------------------------------------------------


def loss_curve(rows: list[dict[str, float]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    steps = [r["step"] for r in rows]
    (loss_line,) = ax.plot(steps, [r["loss"] for r in rows], label="loss")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PlainLogFormatter())
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    twin = ax.twinx()
    (accuracy_line,) = twin.plot(steps, [r["accuracy"] for r in rows], color="tab:orange", label="batch accuracy")
    twin.set_ylabel("batch accuracy")
    twin.set_ylim(0, 1.02)
    ax.set_title("Training loss and accuracy")
    fig.legend(handles=[loss_line, accuracy_line], loc="outside lower center", ncol=2, frameon=False)
    _save(fig, path)


class _PlainLogFormatter(LogFormatter):
    """A log axis's labels as plain numbers (0.01, 3.3), not 10^-2, 1e-02 or 3.3 x 10^0."""

    def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
        return f"{x:g}"


def token_panel(
    rows: dict[str, torch.Tensor],
    start: int,
    vocab: Vocab,
    vocab_size: int,
    title: str,
    path: Path,
    breaks: dict[int, str] | None = None,
    compare: tuple[str, str] | None = None,
) -> None:
    """Rows of tokens over indices start.. as text, wrapped into lines that each begin with their absolute index.

    rows: name -> int64 [width] token ids, all of one width; -1 leaves a position blank (e.g. no data past
    the end), and a row blank over a whole line is left out of that line. breaks: index -> caption; a line
    ends before that index and the caption is shown between. compare: (row, other): the row's tokens that
    differ from the other row's are drawn in red.
    """
    labels = token_labels(vocab, vocab_size)
    names = list(rows)
    texts = {name: [labels[t] if t >= 0 else "" for t in rows[name].tolist()] for name in names}
    width = len(texts[names[0]])
    separator = 1 if isinstance(vocab, int) else 0  # ids need a space between them; characters do not
    cells = [max(1, *(len(texts[name][j]) for name in names)) + separator for j in range(width)]
    breaks = {i - start: caption for i, caption in (breaks or {}).items() if start < i < start + width}
    groups = _wrap(cells, set(breaks))
    index_width = max(len(f"{start + first:,}") for first, _ in groups)
    name_width = max(len(name) for name in names)
    x0 = index_width + 2 + name_width + 2
    columns = x0 + LINE_CHARS + max(cells)
    shown = {label for row in texts.values() for label in row}
    legend = [
        f"{mark} {WHITESPACE_NAMES[ch]}"
        for ch, mark in WHITESPACE.items()
        if not isinstance(vocab, int) and mark in shown
    ]
    if compare is not None:
        legend.append(f"red: {compare[0]} differs from {compare[1]}")

    texts_drawn: list[dict[str, Any]] = []  # _text's arguments; y counts lines from the top
    y = 0.0
    for line in textwrap.wrap(title, columns):
        texts_drawn.append(dict(x=0, y=y, s=line, weight="bold"))
        y += 1
    y += 0.5
    for first, last in groups:
        if first in breaks:
            texts_drawn.append(dict(x=x0, y=y, s=f"── {breaks[first]} ──", color="tab:blue"))
            y += 1
        shown_rows = [name for name in names if any(texts[name][first:last])]  # a row blank here is left out
        for row, name in enumerate(shown_rows):
            if row == 0:
                texts_drawn.append(dict(x=0, y=y, s=f"{start + first:>{index_width},}", color="gray"))
            texts_drawn.append(dict(x=index_width + 2, y=y, s=name, color="gray"))
            x = x0
            for j in range(first, last):
                token = texts[name][j]
                differs = (
                    compare is not None
                    and name == compare[0]
                    and token
                    and texts[compare[1]][j]
                    and token != texts[compare[1]][j]
                )
                if token:
                    texts_drawn.append(dict(x=x, y=y, s=token, color=DIFFERS if differs else "black"))
                x += cells[j]
            y += 1
        y += 0.4
    for line in textwrap.wrap("   ".join(legend), columns):
        texts_drawn.append(dict(x=0, y=y, s=line, color="gray"))
        y += 1

    fig = plt.figure(figsize=((columns + 2) * CHAR_WIDTH / 72, (y + 1) * LINE_HEIGHT / 72))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-1, columns + 1)
    ax.set_ylim(y + 0.5, -0.5)
    ax.axis("off")
    for text in texts_drawn:
        _text(ax, **text)
    _save(fig, path, tight=False)


def _wrap(cells: list[int], breaks: set[int]) -> list[tuple[int, int]]:
    """(first, last) positions of each panel line: at most LINE_CHARS cells (one token if it is wider), a new
    line at every break."""
    groups, first, used = [], 0, 0
    for j, cell in enumerate(cells):
        if j > first and (used + cell > LINE_CHARS or j in breaks):
            groups.append((first, j))
            first, used = j, 0
        used += cell
    groups.append((first, len(cells)))
    return groups


def _text(ax: plt.Axes, x: float, y: float, s: str, color: str = "black", weight: str = "normal") -> None:
    ax.text(x, y, s, family="monospace", fontsize=FONT_SIZE, color=color, weight=weight, va="center", ha="left")


def histogram_bars(
    hist: dict[str, dict[str, float]], vocab: Vocab, other: dict[str, float] | None = None
) -> tuple[list[str], list[dict[str, float]]]:
    """(labels, bars) of the histogram plot, most frequent first (by the larger of the training and predicted
    fractions): the HISTOGRAM_BARS most frequent tokens named, the rest and ``other`` (tokens the evaluation
    already summed, {"tokens", "training", "predicted"}) in one last bar labelled "other (N tokens)"."""
    entries = sorted(hist.items(), key=lambda item: -max(item[1]["training"], item[1]["predicted"]))
    labels = [histogram_label(name, vocab) for name, _ in entries[:HISTOGRAM_BARS]]
    bars = [h for _, h in entries[:HISTOGRAM_BARS]]
    rest = [h for _, h in entries[HISTOGRAM_BARS:]]
    tokens = len(rest) + (int(other["tokens"]) if other is not None else 0)
    if other is not None:
        rest.append(other)
    if rest:
        labels.append(f"other ({tokens:,} tokens)")
        bars.append({key: sum(h[key] for h in rest) for key in ("training", "predicted")})
    return labels, bars


def histogram(
    hist: dict[str, dict[str, float]],
    path: Path,
    predictions: int,
    vocab: Vocab = None,
    other: dict[str, float] | None = None,
) -> None:
    """Horizontal bars of each token's training and predicted fraction (of ``predictions`` after the data),
    most frequent at the top (:func:`histogram_bars`)."""
    labels, bars = histogram_bars(hist, vocab, other)
    y = np.arange(len(bars))
    fig, ax = plt.subplots(figsize=(7, 1.6 + 0.3 * len(bars)), layout="constrained")
    ax.barh(y - 0.2, [b["training"] for b in bars], height=0.4, label="training data")
    ax.barh(y + 0.2, [b["predicted"] for b in bars], height=0.4, label="predicted past the data")
    ax.set_yticks(y, labels, family="monospace")
    ax.margins(y=0.01)
    ax.invert_yaxis()
    ax.set_xlabel("fraction of tokens")
    ax.set_title(
        "\n".join(
            textwrap.wrap(
                f"Token histogram: training data vs {predictions:,} predictions after the data, most frequent first", 60
            )
        )
    )
    fig.legend(loc="outside lower center", ncol=2, frameon=False)
    _save(fig, path)


def extrapolation(bins: dict[str, Any], path: Path) -> None:
    names = [n for n in bins if n != "chance_uniform"]
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.bar(names, [bins[n] for n in names])
    ax.axhline(bins["chance_uniform"], color="red", linestyle="--", label="chance (uniform guesses)")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of valid |xxx chunks")
    ax.set_xlabel("window past the end of the data")
    ax.set_title("Extrapolation: structure of predicted chunks")
    fig.legend(loc="outside lower center", frameon=False)
    _save(fig, path)


def _save(fig: plt.Figure, path: Path, tight: bool = True) -> None:
    with warnings.catch_warnings():  # a token the font cannot draw (e.g. CJK in DejaVu Sans) is drawn as a box
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path, dpi=DPI, bbox_inches="tight" if tight else None, pad_inches=0.1)
    plt.close(fig)
