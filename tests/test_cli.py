"""Command-line smoke tests on tiny runs: every subcommand end to end, in process."""

import importlib.util
import json

import pytest

from aunn_fast.cli import main
from aunn_fast.train import CHECKPOINT_NAME, read_log


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert (
        main(
            [
                "train",
                "--data",
                "toy:60",
                "--out",
                str(out),
                "--hidden",
                "32",
                "--layers",
                "4",
                "--batch-size",
                "64",
                "--epochs",
                "40",
                "--lr",
                "3e-3",
                "--quiet",
                "--log-every",
                "5",
            ]
        )
        == 0
    )
    return out


def test_train_writes_checkpoint_and_log(run_dir):
    assert (run_dir / CHECKPOINT_NAME).exists()
    assert (
        (run_dir / "log.csv")
        .read_text()
        .startswith("step,epoch,loss,accuracy,lr,full_accuracy,full_accuracy_indices,indices_per_s,elapsed_s")
    )


def test_resume_extends_a_run(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["train", "--out", str(copy), "--resume", "--epochs", "45", "--quiet"]) == 0
    assert "done: step 180" in capsys.readouterr().out


def test_eval_writes_metrics_report_and_plots(run_dir):
    assert main(["eval", str(run_dir), "--trials", "3"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"train_accuracy", "train_loss", "bits_per_token", "histogram", "extrapolation", "conditioning"} <= set(
        metrics
    )
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


def test_condition_rejects_unknown_characters_and_an_empty_prompt(run_dir, capsys):
    assert "not in the vocabulary" in _error(["condition", str(run_dir), "--prompt", "|z"], capsys)
    assert "--prompt is empty" in _error(["condition", str(run_dir), "--prompt", ""], capsys)


def test_demo_tiny_preset(tmp_path, capsys):
    assert main(["demo", "--preset", "tiny", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "training accuracy" in out and "conditioning" in out
    assert (tmp_path / "demo" / "metrics.json").exists()
    assert main(["demo", "--preset", "tiny", "--out", str(tmp_path / "demo"), "--quiet"]) == 0  # reruns in place


def test_train_schedule_and_full_pass_options_reach_the_log(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                "toy:20",
                "--out",
                str(out),
                "--steps",
                "6",
                "--batch-size",
                "16",
                "--lr",
                "0.01",
                "--warmup-steps",
                "2",
                "--schedule",
                "linear",
                "--min-lr",
                "0.001",
                "--eval-every",
                "3",
                "--log-every",
                "1",
                *TINY,
            ]
        )
        == 0
    )
    assert "accuracy over 80 training indices" in capsys.readouterr().out
    rows = read_log(out / "log.csv")
    assert [r["lr"] for r in rows] == pytest.approx([0.005, 0.01, 0.01, 0.007, 0.004, 0.001])
    assert [r["full_accuracy_indices"] for r in rows] == [0, 0, 80, 0, 0, 80]


def test_tensorboard_option(tmp_path, capsys, monkeypatch):
    """--tensorboard DIR writes event files; without the package, one line before anything is written."""
    import aunn_fast.cli as cli

    if importlib.util.find_spec("tensorboard") is not None:
        assert (
            main(
                [
                    "train",
                    "--data",
                    "toy:20",
                    "--out",
                    str(tmp_path / "run"),
                    "--steps",
                    "2",
                    "--tensorboard",
                    str(tmp_path / "tb"),
                    *TINY,
                ]
            )
            == 0
        )
        assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    def missing(*args, **kwargs):
        raise ImportError("--tensorboard needs the tensorboard package (pip install tensorboard)")

    monkeypatch.setattr(cli, "TensorBoardLogger", missing)
    out = tmp_path / "other"
    assert "pip install tensorboard" in _error(
        ["train", "--data", "toy:20", "--out", str(out), "--tensorboard", str(tmp_path / "tb2"), *TINY], capsys
    )
    assert not out.exists()


def test_demo_never_overwrites_a_real_run(run_dir, capsys):
    assert "not a demo" in _error(["demo", "--preset", "tiny", "--out", str(run_dir), "--quiet"], capsys)


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert "at least one chunk" in _error(["train", "--data", "toy:0", "--out", str(tmp_path / "x")], capsys)
    assert "no checkpoint" in _error(["eval", str(tmp_path / "missing")], capsys)


def test_bench_subcommand_hands_every_argument_to_the_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "usage: aunn bench" in capsys.readouterr().out


# -- bad input: a one-line error before anything runs, and nothing lost -----------------------------


def _error(argv, capsys):
    """Run the CLI on bad input; it must stop with exit status 2 and one line on stderr, `aunn COMMAND: error:
    ...`. Returns that line."""
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's errors
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"aunn {argv[0]}: error: "), err
    return err.strip()


def _files(path):
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


TINY = ["--hidden", "8", "--layers", "2", "--quiet"]


@pytest.mark.parametrize("extra", [[], ["--steps", "0"], ["--bits", "8"]])
def test_train_never_overwrites_a_run(run_dir, capsys, extra):
    before = _files(run_dir)
    message = _error(["train", "--data", "toy:100", "--out", str(run_dir), *TINY, *extra], capsys)
    assert "already holds a run" in message and "--resume" in message
    assert _files(run_dir) == before


@pytest.mark.parametrize(
    "bad, expected",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-5"], "--batch-size"),
        (["--log-every", "0"], "--log-every"),
        (["--save-every", "0"], "--save-every"),
        (["--epochs", "inf"], "--epochs"),
        (["--epochs", "nan"], "--epochs"),
        (["--steps", "-3"], "--steps"),
        (["--device", "foo"], "--device"),
        (["--precision", "fp16"], "--precision"),
        (["--hidden", "0"], "hidden"),
        (["--bits", "8"], "do not fit in bits=8"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**63)], "--seed"),
        (["--schedule", "step"], "--schedule"),
        (["--warmup-steps", "-1"], "--warmup-steps"),
        (["--min-lr", "1", "--lr", "0.1"], "min_lr <= lr"),
        (["--target-accuracy", "1.5"], "--target-accuracy"),
        (["--target-accuracy", "1"], "needs eval_every"),
        (["--eval-every", "-2"], "--eval-every"),
        (["--focus", "1.5", "--eval-every", "10"], "--focus"),
        (["--focus", "0.25"], "focus needs eval_every"),
    ],
)
def test_train_rejects_bad_values_before_writing_anything(tmp_path, capsys, bad, expected):
    out = tmp_path / "run"
    assert expected in _error(["train", "--data", "toy:100", "--out", str(out), *TINY, *bad], capsys)
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "eval", "generate", "condition", "demo"])
def test_unavailable_device_or_backend_is_a_one_line_error(run_dir, tmp_path, capsys, monkeypatch, command):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton then has no CPU backend
    argv = {
        "train": ["train", "--data", "toy:100", "--out", str(tmp_path / "run"), *TINY],
        "eval": ["eval", str(run_dir)],
        "generate": ["generate", str(run_dir)],
        "condition": ["condition", str(run_dir), "--prompt", "|a"],
        "demo": ["demo", "--preset", "tiny", "--out", str(tmp_path / "run")],
    }[command]
    before = _files(run_dir)
    assert "backend 'triton' is unavailable on cpu" in _error([*argv, "--device", "cpu", "--backend", "triton"], capsys)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert "no CUDA device" in _error([*argv, "--device", "cuda"], capsys)
    assert not (tmp_path / "run").exists() and _files(run_dir) == before


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["generate", "--length", "-5"], "--length"),
        (["generate", "--temperature", "nan"], "--temperature"),
        (["generate", "--temperature", "-1"], "--temperature"),
        (["generate", "--start", "-1"], "--start"),
        (["generate", "--start", str(2**63 - 2), "--length", "3"], "largest index"),
        (["condition", "--prompt", "|a", "--show", "-10"], "--show"),
        (["condition", "--prompt", "|a", "--at", str(2**63 - 2)], "largest index"),
        (["eval", "--trials", "0"], "--trials"),
        (["eval", "--trials", "-3"], "--trials"),
    ],
)
def test_run_commands_reject_bad_values(run_dir, capsys, argv, expected):
    assert expected in _error([argv[0], str(run_dir), *argv[1:]], capsys)


def test_generate_reaches_the_last_index(run_dir, capsys):
    assert main(["generate", str(run_dir), "--start", str(2**63 - 1), "--length", "1"]) == 0
    assert len(capsys.readouterr().out.strip()) == 1


def test_resume_keeps_the_checkpoints_model(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    before = _files(copy)
    assert "--hidden 64 differs from the checkpoint's 32" in _error(
        ["train", "--out", str(copy), "--resume", "--hidden", "64", "--quiet"], capsys
    )
    assert _files(copy) == before
    assert (
        main(["train", "--out", str(copy), "--resume", "--hidden", "32", "--layers", "4", "--steps", "160", "--quiet"])
        == 0
    )  # equal to the checkpoint's: fine


def test_condition_never_saves_over_a_run(run_dir, tmp_path, capsys):
    before = _files(run_dir)
    assert "already holds a run" in _error(
        ["condition", str(run_dir), "--prompt", "|a", "--save", str(run_dir)], capsys
    )
    assert _files(run_dir) == before
    saved = tmp_path / "conditioned"
    assert main(["condition", str(run_dir), "--prompt", "|a", "--show", "2", "--save", str(saved)]) == 0
    assert "no training state" in _error(["train", "--out", str(saved), "--resume", "--quiet"], capsys)


def test_resume_refuses_changed_data(tmp_path, capsys):
    text, out = tmp_path / "data.txt", tmp_path / "run"
    text.write_text("abcabcabc")
    assert main(["train", "--data", f"text:{text}", "--out", str(out), "--steps", "1", *TINY]) == 0
    before = _files(out)
    for edit in ("abcabcabcabc", "abcabcacb"):  # another length; the same length
        text.write_text(edit)
        message = _error(["train", "--out", str(out), "--resume", "--quiet"], capsys)
        assert "changed since the checkpoint was saved" in message and "new run" in message
        assert _files(out) == before
        assert "changed since the checkpoint was saved" in _error(["eval", str(out)], capsys)


def test_token_file_run_end_to_end(tmp_path, capsys):
    """tokens:PATH: train, resume, eval (histogram named by id), generate (ids), condition on an id prompt."""
    import numpy as np

    ids, out = tmp_path / "corpus.npy", tmp_path / "run"
    np.save(ids, (np.arange(600) * 7 % 300).astype(np.uint16))  # 300 ids: the histogram names the top 96
    assert (
        main(["train", "--data", f"tokens:{ids}", "--out", str(out), "--steps", "3", "--batch-size", "32", *TINY]) == 0
    )
    assert main(["train", "--out", str(out), "--resume", "--steps", "4", "--quiet"]) == 0
    assert main(["eval", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["kind"] == "tokens" and metrics["data"]["vocab_size"] == 300
    assert all(name.isdigit() for name in metrics["histogram"]) and "histogram_other" in metrics
    capsys.readouterr()
    assert main(["generate", str(out), "--length", "5"]) == 0
    generated = capsys.readouterr().out.split()
    assert len(generated) == 5 and all(0 <= int(t) < 300 for t in generated)
    assert main(["condition", str(out), "--prompt", "17 299", "--show", "3"]) == 0
    assert "before:" in capsys.readouterr().out
    assert "expected token ids in 0..299" in _error(["condition", str(out), "--prompt", "300"], capsys)


@pytest.mark.parametrize(
    "switch, value",
    [("AUNN_FAST_SIGMOID", "fast"), ("AUNN_FAST_WEIGHT_GRAD", "atomics"), ("AUNN_FAST_FP32_PRODUCTS", "bf16x3")],
)
def test_a_bad_kernel_switch_stops_the_run_before_anything_is_written(
    tmp_path, capsys, monkeypatch, request, switch, value
):
    """AUNN_FAST_SIGMOID / AUNN_FAST_WEIGHT_GRAD / AUNN_FAST_FP32_PRODUCTS are checked up front, by the CLI and
    by the trainer, not at the first kernel call after the run directory exists."""
    from aunn_fast import kernels
    from aunn_fast.data import ToyData
    from aunn_fast.train import TrainConfig, train

    if kernels.unavailable_reason("cpu") is not None:
        pytest.skip(kernels.unavailable_reason("cpu"))
    from aunn_fast.kernels.config import default_options

    monkeypatch.setenv(switch, value)
    default_options.cache_clear()  # read once per process: read again now, and once more after this test
    request.addfinalizer(default_options.cache_clear)
    out = tmp_path / "run"
    message = _error(
        [
            "train",
            "--data",
            "toy:50",
            "--out",
            str(out),
            "--backend",
            "triton",
            "--device",
            "cpu",
            "--steps",
            "2",
            *TINY,
        ],
        capsys,
    )
    assert repr(value) in message and "AUNN_FAST_" in message
    from aunn_fast import AUNN, AUNNConfig

    model = AUNN(AUNNConfig(hidden=16, layers=3), backend="triton", precision="fp32")
    with pytest.raises(ValueError, match="AUNN_FAST_"):
        train(model, ToyData(50), TrainConfig(steps=2, batch_size=16), out)
    assert not out.exists()


def test_run_directories_under_a_file_are_refused_before_any_work(tmp_path, run_dir, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file")
    inside = str(blocker / "sub")
    for argv in (
        ["train", "--data", "toy:50", "--out", inside, "--steps", "1", *TINY],
        ["demo", "--preset", "tiny", "--out", inside, "--quiet"],
        ["condition", str(run_dir), "--prompt", "|a", "--save", inside],
    ):
        message = _error(argv, capsys)
        assert "is a file, not a directory" in message
    assert blocker.read_text() == "a file"


def test_a_run_that_failed_before_its_first_row_leaves_nothing_to_refuse(tmp_path, capsys, monkeypatch):
    """The log begins at the first row: a first step that fails (out of memory, say) does not leave a log that
    makes the directory a run; a log without a checkpoint is refused with its own advice."""
    from aunn_fast import train as train_module

    out = tmp_path / "run"
    argv = ["train", "--data", "toy:50", "--out", str(out), "--steps", "2", "--batch-size", "16", *TINY]

    def out_of_memory(self, step):
        raise RuntimeError("CUDA out of memory (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(train_module.EpochSampler, "indices", out_of_memory)
        assert main(argv) == 1  # an error the package does not know: internal, with its traceback
    assert "simulated" in capsys.readouterr().err
    assert not out.exists()  # nor an empty directory
    assert main(argv) == 0
    (out / CHECKPOINT_NAME).unlink()
    message = _error(argv, capsys)
    assert "log but no checkpoint" in message and "remove" in message


def test_a_checkpoint_saved_outside_a_run_reads_token_ids(tmp_path, capsys):
    """model.save() records no data and no vocabulary: generate prints ids, condition takes them, eval says
    why it cannot run."""
    from aunn_fast import AUNN, AUNNConfig

    run = tmp_path / "api"
    run.mkdir()
    AUNN(AUNNConfig(vocab_size=5, hidden=8, layers=2), seed=0).save(run / CHECKPOINT_NAME)
    assert main(["generate", str(run), "--start", "0", "--length", "6"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 6 and all(t in "01234" for t in printed)
    assert main(["condition", str(run), "--prompt", "4 0", "--at", "100", "--show", "2"]) == 0
    assert "expected token ids in 0..4" in _error(["condition", str(run), "--prompt", "ab", "--at", "0"], capsys)
    assert "does not say which data" in _error(["eval", str(run)], capsys)
    assert "pass an index, not END" in _error(["generate", str(run)], capsys)


def test_eval_refuses_a_broken_log_before_evaluating(tmp_path, run_dir, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "metrics.json").unlink(missing_ok=True)
    (copy / "log.csv").write_text("step,epoch,loss,accuracy,indices_per_s,elapsed_s\n5,x,1,1,1,1\n")
    assert "could not convert" in _error(["eval", str(copy)], capsys)
    assert not (copy / "metrics.json").exists()


@pytest.mark.parametrize("saved", [False, True])
def test_ctrl_c_advice_matches_what_was_saved(tmp_path, capsys, monkeypatch, saved):
    """Ctrl-C during training: exit 130, with --resume advice only where a checkpoint exists to resume from."""
    import aunn_fast.cli as cli

    def interrupted(model, data, cfg, run_dir, **kwargs):
        if saved:
            model.save(run_dir / CHECKPOINT_NAME)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train", interrupted)
    out = tmp_path / "run"
    assert main(["train", "--data", "toy:8", "--out", str(out), "--hidden", "16", "--layers", "2", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert ("--resume" in err) == saved and ("nothing to resume" in err) != saved


def test_train_focus_reaches_the_trainer(tmp_path, capsys):
    """`--focus` is TrainConfig.focus (the digits preset's memorisation aid): the run's recipe line names it."""
    out = tmp_path / "run"
    main(
        ["train", "--data", "toy:100", "--out", str(out), *TINY, "--steps", "4", "--eval-every", "2", "--focus", "0.25"]
    )
    assert "focus 0.25 of the batch on the last full pass's mistakes" in capsys.readouterr().out
