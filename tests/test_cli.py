"""Command-line smoke tests on tiny runs: every subcommand end to end, in process."""
import json

import pytest

from aunn_fast.cli import main
from aunn_fast.train import CHECKPOINT_NAME


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", "toy:60", "--out", str(out), "--hidden", "32", "--layers", "4",
                 "--batch-size", "64", "--epochs", "40", "--lr", "3e-3", "--quiet", "--log-every", "5"]) == 0
    return out


def test_train_writes_checkpoint_and_log(run_dir):
    assert (run_dir / CHECKPOINT_NAME).exists()
    assert (run_dir / "log.csv").read_text().startswith("step,epoch,loss,accuracy,indices_per_s,elapsed_s")


def test_resume_extends_a_run(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["train", "--out", str(copy), "--resume", "--epochs", "45", "--quiet"]) == 0
    assert "done: step 180" in capsys.readouterr().out


def test_eval_writes_metrics_report_and_plots(run_dir):
    assert main(["eval", str(run_dir), "--trials", "3"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"train_accuracy", "train_loss", "bits_per_token", "histogram", "extrapolation",
            "conditioning"} <= set(metrics)
    assert set(metrics["extrapolation"]) >= {"near", "1k", "100k", "10M", "pow2_boundary", "chance_uniform"}
    assert metrics["conditioning"]["trials"] == 3
    assert "training accuracy" in (run_dir / "report.md").read_text()
    for name in ("loss", "end_of_data", "past_10M", "histogram", "extrapolation", "conditioning"):
        assert (run_dir / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_generate_prints_tokens(run_dir, capsys):
    assert main(["generate", str(run_dir), "--length", "12"]) == 0
    text = capsys.readouterr().out.strip()
    assert len(text) == 12 and set(text) <= set("|abc")
    assert main(["generate", str(run_dir), "--start", "1000000", "--length", "8", "--temperature", "1.0"]) == 0
    assert main(["generate", str(run_dir), "--length", "8", "--by-backprop", "--lr", "0.01"]) == 0


def test_condition_prints_before_and_after_and_saves(run_dir, tmp_path, capsys):
    saved = tmp_path / "conditioned"
    assert main(["condition", str(run_dir), "--prompt", "|c", "--show", "6", "--save", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "before:" in out and "after:" in out
    assert (saved / CHECKPOINT_NAME).exists()


def test_condition_rejects_unknown_characters(run_dir):
    with pytest.raises(SystemExit, match="not in the vocabulary"):
        main(["condition", str(run_dir), "--prompt", "|z"])


def test_demo_tiny_preset(tmp_path, capsys):
    assert main(["demo", "--preset", "tiny", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "training accuracy" in out and "conditioning" in out
    assert (tmp_path / "demo" / "metrics.json").exists()
    assert main(["demo", "--preset", "tiny", "--out", str(tmp_path / "demo"), "--quiet"]) == 0  # reruns in place


def test_demo_never_overwrites_a_real_run(run_dir):
    with pytest.raises(SystemExit, match="not a demo"):
        main(["demo", "--preset", "tiny", "--out", str(run_dir), "--quiet"])


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["train", "--data", "toy:0", "--out", str(tmp_path / "x")]) == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path / "missing")])


def test_bench_subcommand_hands_every_argument_to_the_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "usage: aunn bench" in capsys.readouterr().out
