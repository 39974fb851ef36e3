"""Issue 21's examples, one test each: bad values refused with the numbers before any work, training that
stops at the first non-finite loss, one writer per run directory, crafted checkpoints refused naming the
field, nothing half written, and the user's errors told apart from the package's bugs."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aunn_fast import AUNN, AUNNConfig, runlock
from aunn_fast.cli import main
from aunn_fast.data import ToyData
from aunn_fast.errors import AUNNError, ResourceError, RunDirectoryBusy
from aunn_fast.inference import condition, generate, sample
from aunn_fast.runlock import LOCK_NAME, hold
from aunn_fast.train import CHECKPOINT_NAME, LOG_NAME, TrainConfig, load_run, read_log

TINY = ["--hidden", "8", "--layers", "4", "--batch-size", "8", "--quiet", "--device", "cpu"]


def _error(argv, capsys) -> str:
    """Run the CLI on the user's mistake: exit status 2 and one line on stderr, `aunn COMMAND: error: ...`."""
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, err
    lines = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith(f"aunn {argv[0]}: error: "), err
    return lines[0]


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run of 4 steps with a checkpoint at step 2 and at the end."""
    out = tmp_path_factory.mktemp("hardening") / "run"
    assert (
        main(
            [
                "train",
                "--data",
                "toy:16",
                "--out",
                str(out),
                "--steps",
                "4",
                "--save-every",
                "2",
                "--log-every",
                "1",
                *TINY,
            ]
        )
        == 0
    )
    return out


def _copy(run_dir, tmp_path, name="copy"):
    copy = tmp_path / name
    shutil.copytree(run_dir, copy)
    return copy


def _edit_checkpoint(path, tensors=None, metadata=None):
    """Rewrite the checkpoint at path with tensors replaced (None: removed; a callable: of the old tensor)
    and metadata keys replaced (None: removed)."""
    with safe_open(str(path), framework="pt") as f:
        saved = {name: f.get_tensor(name) for name in f.keys()}
        meta = f.metadata()
    for name, value in (tensors or {}).items():
        for key in [k for k in list(saved) if k == name or (name.endswith("*") and k.startswith(name[:-1]))]:
            if value is None:
                del saved[key]
            else:
                saved[key] = value(saved[key]) if callable(value) else value
    for key, value in (metadata or {}).items():
        meta.pop(key) if value is None else meta.__setitem__(key, value)
    save_file(saved, str(path), metadata=meta)


# -- 1. every value checked before any work -------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--data", "toy:200:99999999999999999999999"], r"seed must be in 0\.\.2\*\*63-1"),
        (["--data", "toy:99999999999999999999999"], r"at most 2\*\*61"),
        (["--data", "toy:200", "--epochs", "1e308"], "more than a run can take"),
        (
            ["--data", "toy:200", "--hidden", "10000000", "--layers", "8"],
            r"needs at least [\d.,]+ PB of memory, but cpu",
        ),
        (["--data", "toy:200", "--layers", "100000000", "--hidden", "64"], r"needs at least [\d.,]+ TB of memory"),
    ],
)
def test_train_refuses_values_too_large_with_the_numbers_before_any_work(tmp_path, capsys, argv, expected):
    out = tmp_path / "run"
    message = _error(["train", *argv, "--out", str(out), "--quiet", "--device", "cpu"], capsys)
    assert re.search(expected, message), message
    assert not out.exists()  # no directory left behind


def test_a_token_file_with_a_huge_id_is_refused_with_the_numbers(tmp_path, capsys):
    tokens = tmp_path / "ids.npy"
    np.save(tokens, np.array([0, 1, 2**31 - 2], dtype=np.int64))
    message = _error(["train", "--data", f"tokens:{tokens}", "--out", str(tmp_path / "run"), *TINY], capsys)
    assert "vocab_size=2147483647" in message and "of memory, but cpu has" in message
    assert not (tmp_path / "run").exists()


def test_generate_refuses_a_length_that_cannot_fit(run_dir, capsys):
    message = _error(["generate", str(run_dir), "--length", "1000000000000"], capsys)
    assert "1,000,000,000,000 tokens needs at least" in message and "TB" in message


def test_a_tiny_temperature_is_the_argmax(run_dir, capsys):
    assert main(["generate", str(run_dir), "--length", "30"]) == 0
    argmax = capsys.readouterr().out
    assert main(["generate", str(run_dir), "--length", "30", "--temperature", "1e-300"]) == 0
    assert capsys.readouterr().out == argmax
    logits = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
    for temperature in (1e-300, 5e-324, 1e-30):
        assert torch.equal(sample(logits, temperature, torch.Generator().manual_seed(0)), logits.argmax(-1))


def test_api_sizes_are_checked_before_allocating():
    with pytest.raises(ResourceError, match="parameters.*needs at least"):
        AUNN(AUNNConfig(hidden=10_000_000))
    model = AUNN(AUNNConfig(vocab_size=4, hidden=8, layers=2), seed=0)
    with pytest.raises(ResourceError, match="generating 1,000,000,000,000 tokens"):
        generate(model, 0, 10**12)
    with pytest.raises(ValueError, match="more than a run can take"):
        TrainConfig(epochs=1e308).total_steps(800)
    with pytest.raises(ValueError, match="seed"):
        ToyData(200, 2**70)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"seed": 1.5}, TypeError),
        ({"seed": -1}, ValueError),
        ({"seed": 2**63}, ValueError),
        ({"batch_size": 2.0}, TypeError),
        ({"steps": True}, TypeError),
        ({"lr": float("nan")}, ValueError),
        ({"lr": "1e-3"}, TypeError),
        ({"weight_decay": float("inf")}, ValueError),
        ({"epochs": float("nan")}, ValueError),
        ({"steps": 2**60}, ValueError),
    ],
)
def test_train_config_refuses_wrong_types_and_values(kwargs, error):
    with pytest.raises(error):
        TrainConfig(**kwargs)


def test_condition_refuses_float_targets():
    model = AUNN(AUNNConfig(vocab_size=4, hidden=8, layers=2), seed=0)
    with pytest.raises(TypeError, match="integer token ids"):
        condition(model, torch.tensor([0.5, 1.5]), 10)
    with pytest.raises(ValueError, match="lr"):
        condition(model, torch.tensor([1, 2]), 10, lr=float("nan"))


# -- 2. training stops at the first non-finite loss ---------------------------------------------------------


def test_a_diverging_run_stops_naming_the_step_and_the_cause(tmp_path, capsys):
    out = tmp_path / "run"
    message = _error(["train", "--data", "toy:16", "--out", str(out), "--steps", "20", "--lr", "1e30", *TINY], capsys)
    assert "training diverged: the loss of step" in message and "lr 1e+30" in message
    assert not (out / CHECKPOINT_NAME).exists()


def test_divergence_keeps_the_last_good_checkpoint_and_log(run_dir, tmp_path, capsys):
    """Saving every step: the checkpoint left is the last one whose weights and moments were all finite."""
    copy = _copy(run_dir, tmp_path)
    message = _error(
        ["train", "--out", str(copy), "--resume", "--steps", "40", "--lr", "1e30", "--save-every", "1", "--quiet"],
        capsys,
    )
    diverged = int(re.search(r"(?:step|after step) (\d+)", message).group(1))
    _, state, _, _ = load_run(copy)  # validated whole: finite weights and optimizer moments
    assert 4 <= state["step"] < diverged
    rows = read_log(copy / LOG_NAME)
    assert rows and all(math.isfinite(row["loss"]) and math.isfinite(row["accuracy"]) for row in rows)


def test_resuming_from_nan_optimizer_moments_is_refused(run_dir, tmp_path, capsys):
    copy = _copy(run_dir, tmp_path)
    _edit_checkpoint(copy / CHECKPOINT_NAME, {"extra.optim.0.exp_avg": lambda t: torch.full_like(t, float("nan"))})
    message = _error(["train", "--out", str(copy), "--resume", "--steps", "6"], capsys)
    assert "'extra.optim.0.exp_avg': holds non-finite values" in message


# -- 3. one writer per run directory -------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys
    from aunn_fast.runlock import hold
    with hold(sys.argv[1], "holder"):
        print("held", flush=True)
        sys.stdin.read()
""")


def _holder(path):
    """Another process, holding path's lock until its stdin closes (or it is killed)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_is_refused_and_a_killed_ones_lock_is_taken_over(run_dir, tmp_path, capsys):
    busy = _copy(run_dir, tmp_path, "busy")
    holder = _holder(busy)
    try:
        before = _files(busy)
        for argv in (
            ["train", "--data", "toy:16", "--out", str(busy), "--steps", "2", *TINY],
            ["train", "--out", str(busy), "--resume", "--steps", "6", "--quiet"],
            ["condition", str(run_dir), "--prompt", "|a", "--save", str(busy)],
        ):
            message = _error(argv, capsys)
            assert f"{busy} is in use by holder (pid {holder.pid} on host" in message, message
        assert _files(busy) == before
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file stays, stale
        holder.wait()
    assert (busy / LOCK_NAME).exists()
    assert main(["train", "--out", str(busy), "--resume", "--steps", "6", "--quiet"]) == 0
    assert f"took over the lock of {busy} left by holder (pid {holder.pid}" in capsys.readouterr().err
    assert not (busy / LOCK_NAME).exists()


def test_the_lock_is_reentrant_in_one_process_and_released(tmp_path):
    run = tmp_path / "a" / "b"
    with hold(run, "outer"):
        with hold(run, "inner"):  # the command line holds it, then train() asks again
            assert (run / LOCK_NAME).exists()
        assert (run / LOCK_NAME).exists()
        with pytest.raises(RunDirectoryBusy, match="in use by outer"):  # another open file, as another process's
            runlock._lock(run / LOCK_NAME, run, "second")
    assert not (tmp_path / "a").exists()  # created by the hold and left empty: removed


# -- 4. crafted checkpoints, through the command line ---------------------------------------------------------


@pytest.mark.parametrize(
    "tensors, metadata, expected",
    [
        (
            None,
            {"config": json.dumps({"vocab_size": 4, "hidden": 8192, "layers": 4, "bits": 64})},
            r"tensor 'in_weight': shape \(8, 64\), expected \(8192, 64\)",
        ),
        ({"in_weight": lambda t: t.to(torch.int32)}, None, "'in_weight': dtype I32, expected F32"),
        ({"out_bias": lambda t: t.to(torch.uint8)}, None, "'out_bias': dtype U8"),
        ({"in_gain": lambda t: t.bool()}, None, "'in_gain': dtype BOOL"),
        ({"hidden_weight": lambda t: torch.full_like(t, float("nan"))}, None, "'hidden_weight': holds non-finite"),
        (None, {"data": json.dumps({"chunks": 16, "seed": 0, "length": 64})}, "data.kind: must be one of"),
        (None, {"vocab": json.dumps(["|", "a"])}, "vocab: must list 4 distinct characters"),
        (None, {"vocab": json.dumps(7)}, "vocab: 7 token ids"),
    ],
)
def test_crafted_checkpoints_are_refused_naming_the_file_and_field(
    run_dir, tmp_path, capsys, tensors, metadata, expected
):
    copy = _copy(run_dir, tmp_path)
    _edit_checkpoint(copy / CHECKPOINT_NAME, tensors, metadata)
    before = _files(copy)
    for argv in (["generate", str(copy), "--length", "4"], ["eval", str(copy), "--trials", "1"]):
        message = _error(argv, capsys)
        assert re.search(f"{copy / CHECKPOINT_NAME}: .*{expected}", message), message
    assert _files(copy) == before  # eval wrote nothing


@pytest.mark.parametrize(
    "tensors, metadata, expected",
    [
        ({"extra.optim.*": None}, None, "optimizer state of step 4 is missing"),
        (
            None,
            {"train_state": json.dumps({"step": -5, "elapsed_s": 1.0, "train_config": {}})},
            "train_state.step: must be an integer >= 0, got -5",
        ),
        (None, {"train_state": "{}"}, "train_state.step"),
        ({"extra.optim.1.exp_avg": torch.zeros(3)}, None, r"'extra.optim.1.exp_avg': shape \(3,\)"),
        (
            None,
            {"train_state": json.dumps({"step": 4, "train_config": {"batch_size": 0}})},
            "train_state.train_config: batch_size must be >= 1",
        ),
        (
            None,
            {"train_state": json.dumps({"step": 4, "train_config": {"warp": 9}})},
            "train_state.train_config: .*warp",
        ),
    ],
)
def test_resume_refuses_a_checkpoint_that_cannot_continue_exactly(
    run_dir, tmp_path, capsys, tensors, metadata, expected
):
    copy = _copy(run_dir, tmp_path)
    _edit_checkpoint(copy / CHECKPOINT_NAME, tensors, metadata)
    before = _files(copy)
    message = _error(["train", "--out", str(copy), "--resume", "--steps", "6", "--quiet"], capsys)
    assert re.search(expected, message), message
    assert _files(copy) == before


def test_reset_optimizer_resumes_without_the_optimizer_state_loudly(run_dir, tmp_path, capsys):
    copy = _copy(run_dir, tmp_path)
    _edit_checkpoint(copy / CHECKPOINT_NAME, {"extra.optim.*": None})
    assert main(["train", "--out", str(copy), "--resume", "--steps", "6", "--quiet", "--reset-optimizer"]) == 0
    assert "--reset-optimizer: AdamW restarts with zero moments at step 4" in capsys.readouterr().err
    assert "--reset-optimizer applies to --resume only" in _error(
        ["train", "--data", "toy:16", "--out", str(tmp_path / "new"), "--reset-optimizer", *TINY], capsys
    )


# -- 5. nothing half written ------------------------------------------------------------------------------------


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_temporary_files_of_a_killed_save_are_removed_by_the_next(tmp_path):
    model = AUNN(AUNNConfig(vocab_size=4, hidden=8, layers=2), seed=0)
    path = tmp_path / CHECKPOINT_NAME
    left = [
        tmp_path / f".{CHECKPOINT_NAME}.{_dead_pid()}.0123456789abcdef.tmp",  # a killed writer's
        tmp_path / f".{CHECKPOINT_NAME}.fedcba9876543210.tmp",
    ]  # of a version that named no pid
    alive = tmp_path / f".{CHECKPOINT_NAME}.{os.getppid()}.00112233445566ff.tmp"  # a live writer's: kept
    for file in (*left, alive):
        file.write_bytes(b"half a checkpoint")
    model.save(path)
    assert not any(file.exists() for file in left) and alive.exists()
    assert AUNN.load(path).cfg == model.cfg


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device (simulated)")


def test_a_full_disk_at_the_first_log_row_leaves_no_directory(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr("aunn_fast.train.atomic_write", _disk_full)
    argv = ["train", "--data", "toy:16", "--out", str(out), "--steps", "2", "--log-every", "1", *TINY]
    message = _error(argv, capsys)
    assert "No space left on device" in message
    assert not out.exists()


def test_a_full_disk_during_eval_leaves_the_previous_outputs(run_dir, tmp_path, capsys, monkeypatch):
    copy = _copy(run_dir, tmp_path)
    for name in ("metrics.json", "report.md", "loss.png", "histogram.png"):
        (copy / name).write_text(f"the previous evaluation's {name}")
    killed = copy / f".staging.{_dead_pid()}.0123456789abcdef"  # an eval killed while writing its set
    killed.mkdir()
    (killed / "metrics.json").write_text("half")
    before = _files(copy)
    monkeypatch.setattr("aunn_fast.report.plots.histogram", _disk_full)
    assert "No space left" in _error(["eval", str(copy), "--trials", "1"], capsys)
    assert _files(copy) == before and not [p for p in copy.iterdir() if p.name.startswith(".staging")]


def test_a_failed_condition_save_leaves_no_directory(run_dir, tmp_path, capsys, monkeypatch):
    target = tmp_path / "deep" / "tuned"
    monkeypatch.setattr(AUNN, "save", _disk_full)
    assert "No space left" in _error(["condition", str(run_dir), "--prompt", "|a", "--save", str(target)], capsys)
    assert not (tmp_path / "deep").exists()


# -- 6. the user's errors and the package's bugs --------------------------------------------------------------


def test_a_bug_inside_the_package_is_an_internal_error_with_its_traceback(run_dir, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr("aunn_fast.cli.generate", broken)
    assert main(["generate", str(run_dir), "--length", "3"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert "aunn generate: internal error: ValueError: an internal inconsistency" in err
    assert "This is a bug in aunn_fast" in err and "report it" in err


def test_the_packages_own_errors_keep_the_documented_builtin_types():
    assert issubclass(ResourceError, ValueError) and issubclass(RunDirectoryBusy, ValueError)
    with pytest.raises(FileNotFoundError) as missing:
        AUNN.load("/nonexistent/model.safetensors")
    with pytest.raises(TypeError) as wrong_type:
        AUNNConfig(hidden=1.5)
    assert isinstance(missing.value, AUNNError) and isinstance(wrong_type.value, AUNNError)
