"""Plots read for any vocabulary: tokens as text (characters, bytes as escapes, ids), absolute index labels,
histograms most frequent first with one "other" bar, summaries that say when they are cut."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import aunn_fast.evaluate as evaluate_module
from aunn_fast import AUNN, AUNNConfig, plots
from aunn_fast.data import load_data
from aunn_fast.evaluate import SUMMARY_TOKENS, evaluate, summary
from aunn_fast.report import write_report

CHARS = ["\n", " ", "a", "b", "é", "\x1b", "中"]  # newline, space, ASCII, Latin-1, control, a glyph the font lacks


def test_token_labels_for_each_kind_of_vocabulary():
    assert plots.token_labels(CHARS, len(CHARS)) == ["↵", "·", "a", "b", "é", "\\x1b", "\\u4e2d"]
    byte_labels = plots.token_labels(None, 256)
    assert [byte_labels[b] for b in (0x41, 0x0A, 0x20, 0x00, 0x7F, 0x80, 0xFF)] == [
        "A",
        "↵",
        "·",
        "\\x00",
        "\\x7f",
        "\\x80",
        "\\xff",
    ]
    assert plots.token_labels(50_257, 50_257)[50_256] == "50256"
    assert plots.tokens_per_line(50_257) == plots.LINE_CHARS // 6  # five digits and a space
    assert plots.tokens_per_line(CHARS) == plots.tokens_per_line(None) == plots.LINE_CHARS


def test_histogram_labels_quote_characters_and_keep_ids_and_byte_names():
    assert plots.histogram_label(" ", CHARS) == "' '"
    assert plots.histogram_label("\n", CHARS) == "'\\n'"
    assert plots.histogram_label("中", CHARS) == "'\\u4e2d'"
    assert plots.histogram_label("0x80", None) == "0x80"
    assert plots.histogram_label("7", 300) == "7"


def test_wrap_keeps_lines_within_their_width_and_starts_one_at_each_break():
    cells = [1] * 100 + [4] * 30
    groups = plots._wrap(cells, {70})
    assert groups[0] == (0, plots.LINE_CHARS) and groups[1] == (plots.LINE_CHARS, 70) and groups[-1][1] == 130
    assert all(sum(cells[a:b]) <= plots.LINE_CHARS for a, b in groups)
    assert [a for a, _ in groups] == sorted({a for a, _ in groups})
    assert plots._wrap([plots.LINE_CHARS + 5], set()) == [(0, 1)]  # a token wider than a line still shows


def _drawn(monkeypatch, **panel):
    """The token panel's text calls (x, y, s, color), without drawing."""
    calls = []
    monkeypatch.setattr(
        plots, "_text", lambda ax, x, y, s, color="black", weight="normal": calls.append((x, y, s, color))
    )
    plots.token_panel(**panel)
    return calls


@pytest.mark.parametrize(
    "vocab,vocab_size", [(CHARS, len(CHARS)), (None, 256), (50_257, 50_257)], ids=["text", "bytes", "ids"]
)
def test_token_panel_shows_tokens_as_text_at_absolute_indices(monkeypatch, tmp_path, vocab, vocab_size):
    start, width, end = 2**62 + 5, 150, 2**62 + 105  # past 2**53, where a float axis cannot tell indices apart
    data = torch.arange(width) % vocab_size
    data[end - start :] = -1
    predicted = torch.arange(width) % vocab_size
    predicted[3] = (predicted[3] + 1) % vocab_size
    panel = dict(
        rows={"data": data, "predicted": predicted},
        start=start,
        vocab=vocab,
        vocab_size=vocab_size,
        title="A title long enough to be wrapped rather than clipped: " + "words " * 30,
        path=tmp_path / "panel.png",
        breaks={end: "end of the data"},
        compare=("predicted", "data"),
    )
    calls = _drawn(monkeypatch, **panel)
    labels = plots.token_labels(vocab, vocab_size)
    texts = [s for _, _, s, _ in calls]
    assert texts[0].startswith("A title") and texts[1].startswith("words")  # wrapped over lines
    assert f"{start:,}" in [s.strip() for s in texts] and f"{end:,}" in [s.strip() for s in texts]
    assert "── end of the data ──" in texts
    red = [s for _, _, s, color in calls if color == plots.DIFFERS]
    assert red == [labels[int(predicted[3])]]
    tokens = [s for x, _, s, color in calls if color in ("black", plots.DIFFERS) and x > 0]
    assert sorted(tokens) == sorted(
        [labels[t] for t in data[: end - start].tolist()] + [labels[t] for t in predicted.tolist()]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.token_panel(**panel)
    with Image.open(tmp_path / "panel.png") as image:
        assert image.width < 1200 and image.height < 1200


def test_histogram_bars_most_frequent_first_with_one_other_bar():
    hist = {str(i): {"training": i / 1000, "predicted": (40 - i) / 2000} for i in range(40)}
    labels, bars = plots.histogram_bars(hist, 1000, {"tokens": 960, "training": 0.1, "predicted": 0.2})
    assert len(bars) == plots.HISTOGRAM_BARS + 1
    frequency = [max(b.values()) for b in bars[:-1]]
    assert frequency == sorted(frequency, reverse=True)
    assert labels[-1] == "other (970 tokens)"  # the 10 left out here and the 960 the evaluation summed
    named = {label for label in labels[:-1]}
    rest = [h for name, h in hist.items() if name not in named]
    assert bars[-1]["training"] == pytest.approx(0.1 + sum(h["training"] for h in rest))
    labels, bars = plots.histogram_bars({"a": {"training": 0.5, "predicted": 0.5}}, ["a"])
    assert labels == ["'a'"]


def test_histogram_plot_fits_its_title_and_legend(tmp_path):
    hist = {chr(0x4E00 + i): {"training": 1 / 50, "predicted": i / 1225} for i in range(50)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.histogram(hist, tmp_path / "h.png", 100_000, [chr(0x4E00 + i) for i in range(50)])
    with Image.open(tmp_path / "h.png") as image:
        assert image.width < 1000 and image.height < 1.5 * (1.6 + 0.3 * 31) * plots.DPI


def _metrics(named, other=None, kind="text"):
    metrics = {
        "data": {"kind": kind},
        "train_accuracy": 0.5,
        "train_loss": 1.0,
        "bits_per_token": 1.44,
        "histogram": {name: {"training": 0.1, "predicted": p} for name, p in named.items()},
    }
    if other is not None:
        metrics["histogram_other"] = other
    return metrics


def test_summary_lists_the_most_predicted_tokens_and_says_when_it_is_cut():
    few = summary(_metrics({"a": 0.2, "b": 0.8}))
    assert "predicted histogram 'b': 0.800, 'a': 0.200\n" in few + "\n" and "..." not in few
    many = {chr(97 + i): i / 100 for i in range(SUMMARY_TOKENS + 3)}
    line = summary(_metrics(many, {"tokens": 5, "training": 0.0, "predicted": 0.0})).splitlines()[2]
    assert line.startswith(f"predicted histogram {chr(97 + SUMMARY_TOKENS + 2)!r}: ")
    assert line.endswith(", ... (8 more tokens)")  # 3 named and 5 summed
    ids = summary(_metrics({"50256": 0.9, "7": 0.1}, kind="tokens"))
    assert "predicted histogram 50256: 0.900, 7: 0.100" in ids


@pytest.mark.parametrize("spec", ["text", "bytes", "tokens"])
def test_eval_plots_of_each_data_kind_are_written_without_warnings(tmp_path, monkeypatch, spec):
    """write_report on text (with characters the font lacks), bytes (non-ASCII) and token ids: every plot is
    written, with no missing-glyph or layout warning."""
    monkeypatch.setattr(evaluate_module, "HISTOGRAM_SPAN", 500)
    path = tmp_path / ("data.npy" if spec == "tokens" else "data.txt")
    if spec == "tokens":
        np.save(path, (np.arange(300) * 7 % 1000).astype(np.int64))
    else:
        path.write_text("To be, or not to be:\tthat is the question.\nCAFÉ 中文 \x1b end.\n" * 5, encoding="utf-8")
    data = load_data(f"{spec}:{path}")
    model = AUNN(AUNNConfig(vocab_size=data.vocab_size, hidden=16, layers=3), seed=0)
    model.vocab, model.data_description = data.vocab, data.describe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = write_report(tmp_path / "run", model, data, evaluate(model, data), log_rows=[])
    assert {p.name for p in written} == {
        "metrics.json",
        "report.md",
        "end_of_data.png",
        "past_10M.png",
        "histogram.png",
    }
