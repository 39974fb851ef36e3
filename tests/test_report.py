"""report.md: every table row has its header's number of cells, whatever the cells contain."""
import re

import pytest

from aunn_fast import AUNN, AUNNConfig
from aunn_fast.data import ToyData
from aunn_fast.evaluate import evaluate
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
