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
from aunn_fast.data import ToyData
from aunn_fast.train import (
    CHECKPOINT_NAME,
    LOG_NAME,
    TrainConfig,
    accuracy,
    check_data_fits,
    load_run,
    make_optimizer,
    optimizer_tensors,
    restore_optimizer,
    train,
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
    train(model, data, TrainConfig(batch_size=64, epochs=100, lr=3e-3, log_every=1000), progress=False)
    idx = torch.arange(data.length)
    assert (model.predict(idx) == data.targets(idx)).float().mean() == 1.0


def test_resumed_run_reproduces_the_uninterrupted_losses(tmp_path):
    data = ToyData(chunks=40)
    cfg = TrainConfig(batch_size=32, steps=24, lr=3e-3, log_every=2, save_every=10)
    train(_model(), data, cfg, tmp_path / "full", progress=False)
    train(_model(), data, TrainConfig(**{**cfg.__dict__, "steps": 10}), tmp_path / "part", progress=False)
    model, state, _, _ = load_run(tmp_path / "part")
    assert state["step"] == 10
    train(model, data, cfg, tmp_path / "part", resume=True, progress=False)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    full, part = AUNN.load(tmp_path / "full" / CHECKPOINT_NAME), AUNN.load(tmp_path / "part" / CHECKPOINT_NAME)
    assert all(torch.equal(a, b) for a, b in zip(full.params, part.params))


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
        train(_model(), Interrupting(chunks=40), TrainConfig(batch_size=32, steps=50, save_every=1000),
              tmp_path, progress=False)
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
    the checkpoint says 5 steps for 5 updates, and the resumed run ends where the uninterrupted one does."""
    data = ToyData(chunks=40)
    cfg = TrainConfig(batch_size=32, steps=12, lr=3e-3, log_every=1, save_every=1000)
    train(_model(), data, cfg, tmp_path / "full", progress=False)
    updates = []

    def interrupt_the_fifth(optimizer, args, kwargs):
        updates.append(1)
        if len(updates) == 5:
            os.kill(os.getpid(), signal.SIGINT)

    handle = register_optimizer_step_post_hook(interrupt_the_fifth)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(_model(), data, cfg, tmp_path / "part", progress=False)
    finally:
        handle.remove()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    model, state, _, _ = load_run(tmp_path / "part")
    assert state["step"] == 5 and len(updates) == 5
    train(model, data, cfg, tmp_path / "part", resume=True, progress=False)
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
        group = make_optimizer(model, TrainConfig(lr=2e-3, weight_decay=wd)).param_groups[0]
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
