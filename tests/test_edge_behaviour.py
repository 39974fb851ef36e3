"""Sampling temperature, documented defaults, the pow2 extrapolation window and --resume with other data."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from aunn_fast.cli import build_parser, main
from aunn_fast.evaluate import EXTRAPOLATION_WINDOW, extrapolation_windows
from aunn_fast.inference import sample

CLI_DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def test_a_small_temperature_samples_nearly_the_argmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(2000, 3)
    tokens = sample(logits, 0.05, torch.Generator().manual_seed(0))
    assert (tokens == 2).all()
    hot = sample(logits, 100.0, torch.Generator().manual_seed(0))
    assert (hot == 0).float().mean() > 0.25  # a high temperature is near uniform


def test_eval_trials_default_is_the_documented_one():
    documented = int(re.search(r"`--trials` \((\d+)\)", CLI_DOCS.read_text()).group(1))
    assert build_parser().parse_args(["eval", "somewhere"]).trials == documented == 30


def test_pow2_window_straddles_the_power_of_two():
    for length in (240, 400_000, 10_000_000):
        start, size = extrapolation_windows(length, 2**63 - 1)["pow2_boundary"]
        middle = start + size // 2
        assert size == EXTRAPOLATION_WINDOW and middle & (middle - 1) == 0 and start > length


def test_resume_refuses_other_data(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                "toy:10",
                "--out",
                str(out),
                "--steps",
                "1",
                "--hidden",
                "8",
                "--layers",
                "2",
                "--batch-size",
                "8",
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(["train", "--out", str(out), "--resume", "--data", "toy:20", "--steps", "2", "--quiet", "--device", "cpu"])
        == 2
    )
    assert "--data differs" in capsys.readouterr().err
