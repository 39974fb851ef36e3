"""report.md: every table row has its header's number of cells, whatever the cells contain."""
import re
import warnings

import pytest
import torch
from PIL import Image

from aunn_fast import AUNN, AUNNConfig
from aunn_fast.data import TextData, ToyData
from aunn_fast.evaluate import HISTOGRAM_TOKENS, evaluate
from aunn_fast.report import write_report

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
