"""report.md: every table row has its header's number of cells, whatever the cells contain."""

import re
import types
import warnings

import pytest
import torch
from PIL import Image

import aunn_fast.evaluate as evaluate_module
from aunn_fast import AUNN, AUNNConfig
from aunn_fast.data import TextData, ToyData
from aunn_fast.evaluate import HISTOGRAM_TOKENS, evaluate
from aunn_fast.report import write_report

from helpers import random_model

UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def test_pipes_in_table_cells_are_escaped(tmp_path):
    data = ToyData(chunks=30)
    model = AUNN(AUNNConfig(hidden=16, layers=3), seed=0)
    model.vocab, model.data_description = ToyData.vocab, data.describe()
    write_report(tmp_path, model, data, evaluate(model, data, condition_trials=2), log_rows=[])
    report = (tmp_path / "report.md").read_text()
    assert r"| '\|' |" in report  # the histogram row of the token `|`
    assert r"| `\|" in report  # a conditioning row: the taught `|x` and the chunks before and after
    prose = re.sub(r"^```\n.*?^```\n", "", report, flags=re.MULTILINE | re.DOTALL)  # not the generated sample
    tables = re.findall(r"(?:^\|.*\n)+", prose, flags=re.MULTILINE)
    assert len(tables) == 4  # metrics, histogram, extrapolation, conditioning
    for table in tables:
        widths = {len(UNESCAPED_PIPE.findall(row)) for row in table.splitlines()}
        assert len(widths) == 1, table


def test_evaluate_rejects_zero_conditioning_trials():
    data = ToyData(chunks=30)
    model = AUNN(AUNNConfig(hidden=16, layers=3), seed=0)
    with pytest.raises(ValueError, match="condition_trials"):
        evaluate(model, data, condition_trials=0)


def test_large_vocabulary_histogram_names_the_most_frequent_tokens(tmp_path, generator):
    """300 characters (CJK, which the plot font lacks): the table and the plot name HISTOGRAM_TOKENS of
    them and sum the rest in one row/bar, so neither grows with the vocabulary; no missing-glyph warnings."""
    chars = [chr(0x4E00 + i) for i in range(300)]
    picks = torch.randint(0, len(chars), (3000,), generator=generator).tolist()
    path = tmp_path / "cjk.txt"
    path.write_text("".join(chars) * 50 + "".join(chars[i] for i in picks), encoding="utf-8")  # the sample sees all
    data = TextData(path)
    model = AUNN(AUNNConfig(vocab_size=data.vocab_size, hidden=16, layers=3), seed=0)
    model.vocab, model.data_description = data.vocab, data.describe()
    metrics = evaluate(model, data)
    assert len(metrics["histogram"]) == HISTOGRAM_TOKENS
    other = metrics["histogram_other"]
    assert other["tokens"] == 300 - HISTOGRAM_TOKENS
    named = sum(h["training"] for h in metrics["histogram"].values())
    assert named + other["training"] == pytest.approx(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_report(tmp_path / "run", model, data, metrics, log_rows=[])
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"| {300 - HISTOGRAM_TOKENS} other tokens |" in report
    section = report.split("## Token histogram")[1].split("\n\n")[1]
    assert len(section.splitlines()) == 2 + HISTOGRAM_TOKENS + 1  # header, rule, named, others
    with Image.open(tmp_path / "run" / "histogram.png") as image:
        assert image.width <= 0.3 * (HISTOGRAM_TOKENS + 1) * 110 + 1


def _cells(line):
    return [c.strip() for c in UNESCAPED_PIPE.split(line)[1:-1]]


def test_report_rows_show_their_own_figures(tmp_path):
    data = ToyData(chunks=30)
    model = random_model(AUNNConfig(vocab_size=4, hidden=16, layers=3, bits=16), torch.Generator().manual_seed(1))
    model.vocab = ToyData.vocab
    metrics = evaluate(model, data, condition_trials=1)
    model.predict = lambda idx: idx % 4  # the report's own predictions: `|abc` repeated, from index 120 on
    write_report(tmp_path, model, data, metrics, log_rows=[])
    lines = (tmp_path / "report.md").read_text().splitlines()
    rows = {_cells(line)[0]: _cells(line)[1:] for line in lines if line.startswith("| ")}
    assert rows["training loss"] == [f"{metrics['train_loss']:.5f} nats"]
    assert rows["bits per token"] == [f"{metrics['bits_per_token']:.5f}"]
    for token, h in metrics["histogram"].items():
        assert rows[repr(token).replace("|", r"\|")] == [f"{h['training']:.3f}", f"{h['predicted']:.3f}"]
    for name, (start, size) in metrics["extrapolation_windows"].items():
        assert rows[name] == [f"{start:,}", f"{size:,}", f"{metrics['extrapolation'][name]:.3f}"]
    generated = lines[lines.index("## Generated right after the data") + 3]
    assert generated == "|abc" * 20


def test_past_10m_plot_needs_exactly_its_strip(tmp_path, monkeypatch):
    """The strip 10M past the data is drawn when its 400 indices fit, even with nothing to spare."""
    monkeypatch.setattr(evaluate_module, "FIT_SAMPLE_LIMIT", 2048)
    room = 10_000_000 + 400
    data = ToyData(chunks=(2**24 - room) // 4)
    model = AUNN(AUNNConfig(vocab_size=4, hidden=8, layers=3, bits=24), seed=0)
    model.vocab = ToyData.vocab
    assert evaluate_module.room_after(model, data) == room
    metrics = {"histogram": {"|": {"training": 0.25, "predicted": 1.0}}, "histogram_predictions": 100}
    written = write_report(
        tmp_path,
        model,
        types.SimpleNamespace(length=data.length, targets=data.targets),
        {**metrics, "data": {}, "train_accuracy": 0.5, "train_loss": 1.0, "bits_per_token": 1.4, "scored_indices": 1},
        log_rows=[],
    )
    assert "past_10M.png" in {p.name for p in written}
