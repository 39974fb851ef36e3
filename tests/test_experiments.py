"""The demo presets' experiments beyond the toy sequence: a held-out tail scored against a unigram model, the
demo's options, and the shakespeare recipe memorising a text on the CPU."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aunn_fast import AUNN, AUNNConfig
from aunn_fast.cli import PRESETS, main
from aunn_fast.data import HeldOutTail, TextData, data_from_description
from aunn_fast.evaluate import fit, held_out_fit
from aunn_fast.train import train

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def _text(tmp_path, text):
    path = tmp_path / "t.txt"
    path.write_text(text)
    return TextData(path)


def test_held_out_tail_is_kept_out_of_training(tmp_path):
    whole = _text(tmp_path, "abcab" * 20 + "zzzzz")
    data = HeldOutTail(whole, 5)
    assert data.length == 100 and data.vocab == whole.vocab
    assert data.describe() == {"kind": "held_out_tail", "held_out": 5, "length": 100, "data": whole.describe()}
    reopened = data_from_description(data.describe(), data.vocab)
    assert isinstance(reopened, HeldOutTail) and reopened.length == 100
    for held_out in (0, 105):
        with pytest.raises(ValueError, match="held out"):
            HeldOutTail(whole, held_out)


def test_held_out_bits_against_unigram(tmp_path):
    data = HeldOutTail(_text(tmp_path, "aaab" * 10 + "abzb"), 4)
    model = AUNN(AUNNConfig(vocab_size=3, hidden=16, layers=3), backend="reference", seed=0)
    metrics = held_out_fit(model, data)
    tail = torch.arange(40, 44)
    targets = torch.tensor([0, 1, 2, 1])  # a, b, z, b
    with torch.no_grad():
        bits = F.cross_entropy(model(tail), targets).item() / np.log(2)
    counts = np.array([30, 10, 0]) + 1  # training a, b, z; add-one smoothed
    unigram = -np.log2(counts[[0, 1, 2, 1]] / counts.sum()).mean()
    assert metrics["bits_per_token"] == pytest.approx(bits, rel=1e-5)
    assert metrics["unigram_bits_per_token"] == pytest.approx(unigram)
    assert metrics["unigram_accuracy"] == 0.25  # the most frequent training token, a, is right once


def test_demo_refusals_are_one_line(tmp_path, capsys):
    assert main(["demo", "--preset", "shakespeare", "--out", str(tmp_path / "a")]) == 2
    assert "needs --data" in capsys.readouterr().err
    path = tmp_path / "t.txt"
    path.write_text("abc")
    assert (
        main(["demo", "--preset", "tiny", "--data", f"text:{path}", "--hold-out", "3", "--out", str(tmp_path / "b")])
        == 2
    )
    assert "held out" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="shared/data/tinyshakespeare.txt is absent")
def test_shakespeare_recipe_memorises_20000_characters(tmp_path):
    """The shakespeare preset's recipe (epochs, learning-rate schedule, weight decay, depth) on its first 20,000
    characters, scaled to them: H=128 (82k parameters, 4.1 per character as H=1024's 4.3M are 3.9 for the
    whole text), batch 1,024 (20 steps per epoch, as 65,536 gives 18), the learning rate times sqrt(1024 / 128).
    About 6M indices on the CPU's fastest backend (cpp where built): the most expensive test here
    (docs/experiments.md)."""
    preset = PRESETS["shakespeare"]
    path = tmp_path / "first20k.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    data = TextData(path)
    hidden = 128
    cfg = replace(
        preset.train,
        batch_size=1024,
        lr=preset.train.lr * math.sqrt(preset.hidden / hidden),
        log_every=10**9,
        save_every=10**9,
    )
    model = AUNN(AUNNConfig(vocab_size=data.vocab_size, hidden=hidden, layers=preset.layers), backend="auto", seed=0)
    train(model, data, cfg, progress=False)
    assert fit(model, data, torch.Generator())["train_accuracy"] >= 0.99


def test_demo_holds_out_a_tail_that_eval_scores_again(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("the cat sat on the mat. " * 20)
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--preset",
                "tiny",
                "--data",
                f"text:{path}",
                "--hold-out",
                "48",
                "--out",
                str(out),
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    held = json.loads((out / "metrics.json").read_text())["held_out"]
    assert held["tokens"] == 48 and held["bits_per_token"] > 0 and 0 <= held["accuracy"] <= 1
    assert main(["eval", str(out), "--device", "cpu"]) == 0  # the checkpoint reopens the held-out split
    assert json.loads((out / "metrics.json").read_text())["held_out"] == held
