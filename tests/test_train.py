"""Training: it learns, checkpoints atomically, saves on Ctrl-C, and resumes exactly."""

import csv
import os
import signal
import types

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import aunn_fast.train as train_module
from aunn_fast import AUNN, AUNNConfig
from aunn_fast.callbacks import Callback
from aunn_fast.data import ToyData
from aunn_fast.schedule import StepSchedule, lr_at
from aunn_fast.train import (
    CHECKPOINT_NAME,
    LOG_NAME,
    TrainConfig,
    accuracy,
    check_data_fits,
    load_run,
    optimizer_tensors,
    restore_optimizer,
    train,
    training_optimizer,
)


def _model(seed=0):
    return AUNN(AUNNConfig(vocab_size=4, hidden=32, layers=4), seed=seed)


def _log_rows(run_dir):
    with (run_dir / LOG_NAME).open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _losses(run_dir):
    return [(int(r["step"]), r["loss"]) for r in _log_rows(run_dir)]


def test_training_memorises_a_small_toy_sequence():
    data = ToyData(chunks=50)
    model = _model()
    train(model, data, TrainConfig(batch_size=64, epochs=100, lr=1e-2, log_every=1000), progress=False)
    idx = torch.arange(data.length)
    assert (model.predict(idx) == data.targets(idx)).float().mean() == 1.0


class StopAtStep(Callback):
    """Stops a run after a given step, as an interruption would (the run is checkpointed there)."""

    def __init__(self, step):
        self.step, self.rows, self.ended = step, [], None

    def on_log(self, row):
        self.rows.append(row)
        return row["step"] >= self.step

    def on_end(self, rows):
        self.ended = rows


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_resumed_run_continues_the_schedule_exactly(tmp_path, schedule):
    """A run stopped at step 10 and resumed logs the losses and learning rates of the uninterrupted run, warm-up
    and decay included, and ends with its weights."""
    data = ToyData(chunks=40)
    cfg = TrainConfig(
        batch_size=32, steps=24, lr=3e-3, warmup_steps=4, schedule=schedule, min_lr=3e-4, log_every=2, save_every=1000
    )
    train(_model(), data, cfg, tmp_path / "full", progress=False)
    train(_model(), data, cfg, tmp_path / "part", progress=False, callbacks=[StopAtStep(10)])
    model, state, _, _ = load_run(tmp_path / "part")
    assert state["step"] == 10
    train(model, data, cfg, tmp_path / "part", resume=True, progress=False)
    full, part = _log_rows(tmp_path / "full"), _log_rows(tmp_path / "part")
    assert [(r["step"], r["loss"], r["lr"]) for r in part] == [(r["step"], r["loss"], r["lr"]) for r in full]
    after_warmup = {r["lr"] for r in full if r["step"] > 4}
    assert len(after_warmup) == (1 if schedule == "constant" else len(full) - 2)  # the schedule did move
    full, part = AUNN.load(tmp_path / "full" / CHECKPOINT_NAME), AUNN.load(tmp_path / "part" / CHECKPOINT_NAME)
    assert all(torch.equal(a, b) for a, b in zip(full.params, part.params))


def test_schedule_values_at_chosen_steps():
    """Warm-up to lr over 10 steps, then half a cosine (or a line) over steps 10..110 to min_lr, held after."""
    values = {
        schedule: [lr_at(step, 111, 1.0, 10, schedule, 0.1) for step in (0, 4, 9, 10, 35, 60, 110, 500)]
        for schedule in ("cosine", "linear", "constant")
    }
    assert values["cosine"] == pytest.approx([0.1, 0.5, 1.0, 1.0, 0.1 + 0.9 * (2 + 2**0.5) / 4, 0.55, 0.1, 0.1])
    assert values["linear"] == pytest.approx([0.1, 0.5, 1.0, 1.0, 0.775, 0.55, 0.1, 0.1])
    assert values["constant"] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert lr_at(0, 1, 2e-3, 0, "cosine", 1e-4) == 1e-4  # a one-step run is all decay
    assert lr_at(5, 5, 2e-3, 10, "cosine", 0.0) == pytest.approx(1.2e-3)  # still warming up when it ends
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, 10, 1.0, 0, "step", 0.0)


def test_each_logged_row_has_the_learning_rate_of_its_step(tmp_path):
    data = ToyData(chunks=40)
    cfg = TrainConfig(batch_size=32, steps=9, lr=1e-2, warmup_steps=3, min_lr=1e-3, log_every=1, save_every=1000)
    train(_model(), data, cfg, tmp_path, progress=False)
    assert [r["lr"] for r in _log_rows(tmp_path)] == pytest.approx([cfg.lr_at(s, 9) for s in range(9)])


def test_step_schedule_sets_every_group_and_its_state_is_the_step():
    model = _model()
    optimizer = torch.optim.SGD([{"params": [model.in_weight]}, {"params": [model.out_weight]}], lr=1.0)
    schedule = StepSchedule(optimizer, lambda step: 1.0 / (step + 1))
    for _ in range(3):
        optimizer.step()
        schedule.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.25]
    again = StepSchedule(optimizer, lambda step: 10.0 * step)  # other settings: the saved step, its curve
    again.load_state_dict(schedule.state_dict())
    assert again.last_epoch == 3 and again.get_last_lr() == [30.0, 30.0]
    assert "rate" not in schedule.state_dict()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"schedule": "step"}, "unknown schedule"),
        ({"min_lr": 2e-3, "lr": 1e-3}, "min_lr <= lr"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"eval_every": -1}, "eval_every"),
        ({"clip_grad_norm": 0.0}, "clip_grad"),
        ({"target_accuracy": 1.0}, "needs eval_every"),
        ({"target_accuracy": 1.5, "eval_every": 5}, "in \\(0, 1\\]"),
    ],
)
def test_train_config_rejects_bad_schedules(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_eval_every_logs_the_accuracy_over_the_whole_data(tmp_path):
    """Measured every eval_every steps and at the last, over every index; NaN (and 0 indices) elsewhere."""
    data = ToyData(chunks=40)  # 160 indices
    cfg = TrainConfig(batch_size=32, steps=7, lr=3e-3, log_every=2, eval_every=3, save_every=1000)
    model = _model()
    seen = StopAtStep(10**9)
    train(model, data, cfg, tmp_path, progress=False, callbacks=[seen])
    rows = _log_rows(tmp_path)
    assert [r["step"] for r in rows] == [2, 3, 4, 6, 7]
    measured = [r for r in rows if r["full_accuracy_indices"]]
    assert [r["step"] for r in measured] == [3, 6, 7] and all(r["full_accuracy_indices"] == 160 for r in measured)
    assert all(r["full_accuracy"] != r["full_accuracy"] for r in rows if r not in measured)  # NaN
    idx = torch.arange(160)
    assert measured[-1]["full_accuracy"] == pytest.approx(accuracy(model, idx, data.targets(idx)))
    assert len(seen.rows) == 5 and seen.ended is not None and len(seen.ended) == 5


def test_full_pass_accuracy_above_the_limit_scores_a_fixed_sample(monkeypatch):
    monkeypatch.setattr(train_module, "FULL_PASS_LIMIT", 50)
    data = ToyData(chunks=40)
    rows = train(_model(), data, TrainConfig(batch_size=32, steps=4, lr=3e-3, eval_every=2), progress=False)
    assert [r["full_accuracy_indices"] for r in rows] == [50, 50]
    a = train_module.full_pass_indices(160, 3, torch.device("cpu"))
    assert a.shape == (50,) and torch.equal(a, train_module.full_pass_indices(160, 3, torch.device("cpu")))


def test_target_accuracy_stops_the_run_once_reached(tmp_path):
    data = ToyData(chunks=10)
    cfg = TrainConfig(batch_size=40, steps=2000, lr=1e-2, eval_every=10, target_accuracy=1.0, save_every=10**6)
    rows = train(_model(), data, cfg, tmp_path, progress=False)
    assert rows[-1]["full_accuracy"] == 1.0 and rows[-1]["step"] < 2000
    assert [r for r in rows if r["full_accuracy"] == 1.0] == rows[-1:]
    assert load_run(tmp_path)[1]["step"] == rows[-1]["step"]  # checkpointed where it stopped


def test_a_callers_optimizer_scheduler_and_callbacks_drive_the_run(tmp_path):
    """train() steps the caller's optimizer and scheduler (the log shows the scheduler's rates), checkpoints
    both, and restores them on resume: the resumed run equals the uninterrupted one."""
    data = ToyData(chunks=40)
    cfg = TrainConfig(batch_size=32, steps=12, log_every=1, save_every=1000)

    def run(run_dir, model, resume=False, callbacks=()):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)
        train(
            model,
            data,
            cfg,
            run_dir,
            resume=resume,
            progress=False,
            optimizer=optimizer,
            scheduler=scheduler,
            callbacks=callbacks,
        )
        return optimizer

    optimizer = run(tmp_path / "full", _model())
    assert all("momentum_buffer" in optimizer.state[p] for p in optimizer.state)
    rows = _log_rows(tmp_path / "full")
    assert [r["lr"] for r in rows] == pytest.approx([0.5 * 0.9**s for s in range(12)])
    run(tmp_path / "part", _model(), callbacks=[StopAtStep(5)])
    run(tmp_path / "part", load_run(tmp_path / "part")[0], resume=True)
    assert [(r["loss"], r["lr"]) for r in _log_rows(tmp_path / "part")] == [(r["loss"], r["lr"]) for r in rows]


def test_tensorboard_logger_writes_the_training_and_evaluation_figures(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aunn_fast.callbacks import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path / "tb"))
    train(
        _model(),
        ToyData(chunks=40),
        TrainConfig(batch_size=32, steps=6, log_every=2, eval_every=3),
        progress=False,
        callbacks=[logger],
    )
    logger.log_metrics({"train_accuracy": 0.5, "extrapolation": {"near": 0.25}, "data": {"kind": "toy"}}, 6)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/accuracy",
        "train/lr",
        "train/indices_per_s",
        "train/full_accuracy",
        "eval/train_accuracy",
        "eval/extrapolation/near",
    } <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 3, 4, 6]
    assert [e.step for e in events.Scalars("train/full_accuracy")] == [3, 6]
    assert events.Scalars("eval/extrapolation/near")[0].value == 0.25


def test_tensorboard_missing_is_a_clear_error(monkeypatch):
    import builtins

    from aunn_fast.callbacks import TensorBoardLogger

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardLogger("unused")


def test_elapsed_time_continues_across_a_resume(tmp_path, monkeypatch):
    """log.csv's elapsed_s is the run's training time: a resumed run counts on from its checkpoint's."""
    import aunn_fast.train as train_module

    clock = iter(range(0, 10**6, 10))  # every reading of the clock is 10 s after the previous
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    data = ToyData(chunks=40)
    cfg = TrainConfig(batch_size=32, steps=8, lr=3e-3, log_every=2, save_every=1000)
    train(_model(), data, TrainConfig(**{**cfg.__dict__, "steps": 4}), tmp_path, progress=False)
    model, state, _, _ = load_run(tmp_path)
    train(model, data, cfg, tmp_path, resume=True, progress=False)
    with (tmp_path / LOG_NAME).open() as f:
        elapsed = [float(row["elapsed_s"]) for row in csv.DictReader(f)]
    assert elapsed == sorted(elapsed) and elapsed[2] > state["elapsed_s"] >= elapsed[1] > 0


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    class Interrupting(ToyData):
        calls = 0

        def targets(self, idx):
            self.calls += 1
            if self.calls == 6:
                raise KeyboardInterrupt
            return super().targets(idx)

    with pytest.raises(KeyboardInterrupt):
        train(
            _model(),
            Interrupting(chunks=40),
            TrainConfig(batch_size=32, steps=50, save_every=1000),
            tmp_path,
            progress=False,
        )
    _, state, extra, _ = load_run(tmp_path)
    assert state["step"] == 5 and any(k.startswith("optim.") for k in extra)
    assert not list(tmp_path.glob(".*.tmp"))


def test_data_fits_exactly_up_to_the_largest_index():
    """bits=8 holds indices 0..255: 256 tokens fit, 257 do not."""
    cfg = AUNNConfig(hidden=16, layers=3, bits=8)
    check_data_fits(types.SimpleNamespace(length=256), cfg)
    with pytest.raises(ValueError, match="257 indices do not fit in bits=8"):
        check_data_fits(types.SimpleNamespace(length=257), cfg)


def test_restore_optimizer_keeps_the_resuming_optimizers_settings():
    """Moments and step counts come from the checkpoint; learning rate and implementation flags
    (a CPU run resumed on CUDA must become capturable) stay those of the optimizer resuming."""
    model = _model()
    saved_opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    idx = torch.arange(16)
    model.loss(idx, idx % 4).backward()
    saved_opt.step()
    tensors, groups = optimizer_tensors(saved_opt)
    resumed = torch.optim.AdamW(model.parameters(), lr=5e-4, foreach=True, capturable=True)
    restore_optimizer(resumed, tensors, groups)
    group = resumed.param_groups[0]
    assert (group["lr"], group["foreach"], group["capturable"]) == (5e-4, True, True)
    for p in model.parameters():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed.state[p][key].cpu(), saved_opt.state[p][key].cpu()), key


def test_ctrl_c_mid_step_finishes_the_step_and_resumes_exactly(tmp_path):
    """SIGINT inside an optimizer step (after the weights moved, before the step counted): the step completes,
    the checkpoint says 5 steps for 5 updates, and the resumed run ends where the uninterrupted one does. The
    hook stays registered through all three runs: a step hook sends the cpp backend's trainer to the eager
    step (torch's optimizer.step), and bit-for-bit equality needs every run on the same path."""
    data = ToyData(chunks=40)
    cfg = TrainConfig(batch_size=32, steps=12, lr=3e-3, log_every=1, save_every=1000)
    updates, armed = [], []

    def interrupt_the_fifth(optimizer, args, kwargs):
        if armed:
            updates.append(1)
            if len(updates) == 5:
                os.kill(os.getpid(), signal.SIGINT)

    handle = register_optimizer_step_post_hook(interrupt_the_fifth)
    try:
        train(_model(), data, cfg, tmp_path / "full", progress=False)
        armed.append(True)
        with pytest.raises(KeyboardInterrupt):
            train(_model(), data, cfg, tmp_path / "part", progress=False)
        armed.clear()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
        model, state, _, _ = load_run(tmp_path / "part")
        assert state["step"] == 5 and len(updates) == 5
        train(model, data, cfg, tmp_path / "part", resume=True, progress=False)
    finally:
        handle.remove()
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    full, part = AUNN.load(tmp_path / "full" / CHECKPOINT_NAME), AUNN.load(tmp_path / "part" / CHECKPOINT_NAME)
    assert all(torch.equal(a, b) for a, b in zip(full.params, part.params))


def test_resume_after_a_crash_cuts_the_log_and_loads_the_checkpoints_weights(tmp_path):
    """A crash (not Ctrl-C: nothing saved) after the step-4 checkpoint leaves log rows 5-6 behind; resuming
    into a model with other weights must load the checkpoint's and rewrite the log from step 4 on."""
    data = ToyData(chunks=40)
    cfg = TrainConfig(batch_size=32, steps=10, lr=3e-3, log_every=1, save_every=4)
    train(_model(), data, cfg, tmp_path / "full", progress=False)

    class Crashing(ToyData):
        calls = 0

        def targets(self, idx):
            self.calls += 1
            if self.calls == 7:
                raise RuntimeError("simulated crash")
            return super().targets(idx)

    with pytest.raises(RuntimeError, match="simulated"):
        train(_model(), Crashing(chunks=40), cfg, tmp_path / "part", progress=False)
    assert [step for step, _ in _losses(tmp_path / "part")] == [1, 2, 3, 4, 5, 6]
    assert load_run(tmp_path / "part")[1]["step"] == 4
    train(_model(seed=99), data, cfg, tmp_path / "part", resume=True, progress=False)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    full, part = AUNN.load(tmp_path / "full" / CHECKPOINT_NAME), AUNN.load(tmp_path / "part" / CHECKPOINT_NAME)
    assert all(torch.equal(a, b) for a, b in zip(full.params, part.params))


def test_a_failed_checkpoint_write_leaves_the_previous_file(tmp_path, monkeypatch):
    """atomic_write: the file is written beside and renamed over; a write that fails midway leaves the old
    checkpoint whole and no temporary file."""
    import aunn_fast.checkpoint as checkpoint

    path = tmp_path / CHECKPOINT_NAME
    model = _model()
    model.save(path)
    old = path.read_bytes()

    def half_then_fail(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint.Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        _model(seed=5).save(path)
    assert path.read_bytes() == old and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names open files through Linux's /proc")
def test_a_checkpoint_reaches_the_disk_before_it_replaces_the_previous_one(tmp_path, monkeypatch):
    """atomic_write syncs the new file before the rename (a crash then leaves the old file or the whole new
    one, never a renamed empty file) and the directory after it (so the rename itself survives)."""
    import aunn_fast.checkpoint as checkpoint

    events = []
    real_fsync, real_replace = checkpoint.os.fsync, checkpoint.os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    _model().save(tmp_path / CHECKPOINT_NAME)
    (_, synced_file), (_, renamed), (_, synced_dir) = events
    assert synced_file == renamed and renamed.endswith(".tmp") and synced_dir == str(tmp_path)


def test_train_config_lengths():
    """steps=0 is a valid (empty) run, negative steps are not; epochs round up to whole steps, and a short
    last batch counts as a step."""
    assert TrainConfig(steps=0).total_steps(100) == 0
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=-1)
    cfg = TrainConfig(batch_size=32, epochs=1.1)
    assert cfg.steps_per_epoch(100) == 4
    assert cfg.total_steps(100) == 5  # 4.4 steps: the started one is taken
    assert TrainConfig(batch_size=32, epochs=1.0).total_steps(100) == 4


def test_optimizer_uses_the_configured_weight_decay():
    model = _model()
    for wd in (0.0, 0.1):
        group = training_optimizer(model, TrainConfig(lr=2e-3, weight_decay=wd)).param_groups[0]
        assert (group["lr"], group["weight_decay"]) == (2e-3, wd)


def test_batch_order_follows_the_seed():
    """TrainConfig.seed sets the batch order: the same seed reproduces a run, another seed changes it."""
    data = ToyData(chunks=20)

    def run(seed):
        model = _model()
        train(model, data, TrainConfig(batch_size=16, steps=3, lr=3e-3, seed=seed), progress=False)
        return [p.detach().clone() for p in model.parameters()]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_log_rows_epoch_accuracy_and_the_last_step(tmp_path):
    """Rows every log_every steps and at the last step; epoch is fractional; accuracy is a fraction."""
    data = ToyData(chunks=40)  # 160 indices: 5 batches of 32 per epoch
    rows = train(_model(), data, TrainConfig(batch_size=32, steps=7, lr=3e-3, log_every=3), tmp_path, progress=False)
    logged = _log_rows(tmp_path)
    assert [r["step"] for r in logged] == [r["step"] for r in rows] == [3, 6, 7]
    assert [r["epoch"] for r in logged] == pytest.approx([3 / 5, 6 / 5, 7 / 5])
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in logged)
    model = _model()
    idx = torch.arange(32)
    expected = (model.predict(idx) == data.targets(idx)).double().mean().item()
    assert 0 < expected < 1 and accuracy(model, idx, data.targets(idx)) == pytest.approx(expected)


def test_throughput_after_a_resume_counts_only_the_resumed_time(tmp_path, monkeypatch):
    """indices_per_s is the indices seen by this process over its own training time, not over the run's."""
    clock = iter(range(0, 10**6, 10))
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    data = ToyData(chunks=40)
    cfg = TrainConfig(batch_size=32, steps=8, lr=3e-3, log_every=2, save_every=1000)
    train(_model(), data, TrainConfig(**{**cfg.__dict__, "steps": 4}), tmp_path, progress=False)
    _, state, _, _ = load_run(tmp_path)
    assert state["elapsed_s"] > 0
    train(_model(), data, cfg, tmp_path, resume=True, progress=False)
    for row in _log_rows(tmp_path):
        before = 0.0 if row["step"] <= 4 else state["elapsed_s"]
        seen = 32 * (row["step"] - (0 if row["step"] <= 4 else 4))
        assert row["indices_per_s"] == pytest.approx(seen / (row["elapsed_s"] - before))


def test_a_checkpoint_without_optimizer_state_cannot_be_resumed(tmp_path):
    _model().save(tmp_path / CHECKPOINT_NAME, extra_metadata={"train_state": '{"step": 3}'})
    with pytest.raises(ValueError, match="no training state"):
        load_run(tmp_path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_tiny_preset_memorises_whatever_the_seed(seed):
    """`aunn demo --preset tiny --seed S`'s training, without the evaluation: 100% over the whole data."""
    from dataclasses import replace

    from aunn_fast.cli import PRESETS
    from aunn_fast.data import load_data

    preset = PRESETS["tiny"]
    data = load_data(preset.data)
    model = AUNN(AUNNConfig(vocab_size=data.vocab_size, hidden=preset.hidden, layers=preset.layers), seed=seed)
    cfg = replace(preset.train, seed=seed, log_every=10**6)
    train(model, data, cfg, progress=False)
    idx = torch.arange(data.length)
    assert accuracy(model, idx, data.targets(idx)) == 1.0


def test_a_checkpoint_saved_before_schedules_resumes_on_the_schedule_at_its_step(tmp_path):
    """A checkpoint without scheduler state (written before schedules were saved) resumes with the learning rate
    of its step, as the uninterrupted run had it."""
    from aunn_fast import checkpoint

    data = ToyData(chunks=40)
    cfg = TrainConfig(batch_size=32, steps=12, lr=1e-2, warmup_steps=2, log_every=1, save_every=1000)
    train(_model(), data, cfg, tmp_path / "full", progress=False)
    train(_model(), data, cfg, tmp_path / "part", progress=False, callbacks=[StopAtStep(5)])
    saved = checkpoint.load(tmp_path / "part" / CHECKPOINT_NAME)
    model = load_run(tmp_path / "part")[0]
    model.save(
        tmp_path / "part" / CHECKPOINT_NAME,
        extra=saved.extra,
        extra_metadata={k: v for k, v in saved.metadata.items() if k in ("optimizer_groups", "train_state")},
    )
    assert "scheduler" not in checkpoint.load(tmp_path / "part" / CHECKPOINT_NAME).metadata
    train(model, data, cfg, tmp_path / "part", resume=True, progress=False)
    full, part = _log_rows(tmp_path / "full"), _log_rows(tmp_path / "part")
    assert [(r["loss"], r["lr"]) for r in part] == [(r["loss"], r["lr"]) for r in full]


@pytest.mark.parametrize("clip", [0.05, None])
def test_gradients_are_clipped_before_every_step(clip):
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for p in optimizer.param_groups[0]["params"]]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    model = _model()
    optimizer = training_optimizer(model, TrainConfig())
    handle = optimizer.register_step_pre_hook(record)
    train(
        model,
        ToyData(chunks=40),
        TrainConfig(batch_size=32, steps=5, clip_grad_norm=clip),
        progress=False,
        optimizer=optimizer,
    )
    handle.remove()
    assert len(norms) == 5
    assert all(n <= 0.05 * (1 + 1e-5) for n in norms) == (clip is not None)
