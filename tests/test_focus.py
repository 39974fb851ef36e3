"""TrainConfig.focus: after each full pass, every step adds indices that pass predicted wrong."""

import csv

import pytest
import torch

import aunn_fast.train as train_module
from aunn_fast import AUNN, AUNNConfig
from aunn_fast.callbacks import Callback
from aunn_fast.data import ToyData
from aunn_fast.sampler import EpochSampler, focus_indices
from aunn_fast.train import LOG_NAME, TrainConfig, load_run, mistakes, train


def _model():
    return AUNN(AUNNConfig(vocab_size=4, hidden=16, layers=3), seed=0)


class RecordingData(ToyData):
    """Toy data that keeps every index batch it is asked for."""

    def __init__(self, chunks):
        super().__init__(chunks)
        self.asked = []

    def targets(self, idx):
        self.asked.append(idx.clone())
        return super().targets(idx)


def test_focus_indices_walk_the_set_a_few_at_a_time():
    chosen = torch.tensor([7, 3, 11, 5, 2])
    assert focus_indices(chosen, 0, 2).tolist() == [7, 3]
    assert focus_indices(chosen, 1, 2).tolist() == [11, 5]
    assert focus_indices(chosen, 2, 2).tolist() == [2, 7]
    assert focus_indices(chosen, 4, 9).tolist() == [7, 3, 11, 5, 2]  # never more than the set, each once
    assert focus_indices(torch.zeros(0, dtype=torch.int64), 3, 4).numel() == 0


def test_focus_needs_a_full_pass_and_a_share_of_the_batch():
    with pytest.raises(ValueError, match="focus needs eval_every"):
        TrainConfig(focus=0.25)
    for share in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="focus must be in"):
            TrainConfig(focus=share, eval_every=10)
    assert TrainConfig(batch_size=512, focus=0.25, eval_every=10).focus_size() == 128
    assert TrainConfig(batch_size=100, focus=0.011, eval_every=10).focus_size() == 2


def test_steps_after_a_full_pass_add_the_indices_it_found_wrong():
    """Steps 0-1 train on the sampler's batches alone; the full pass after them finds some indices wrong, and
    steps 2-3 add focus_indices of exactly those to the sampler's batches."""
    cfg = TrainConfig(
        batch_size=64, steps=4, lr=1e-2, warmup_steps=1, schedule="constant", eval_every=2, focus=0.5, log_every=100
    )
    twin = _model()
    train(twin, ToyData(chunks=50), TrainConfig(**{**cfg.__dict__, "steps": 2, "focus": 0.0}), progress=False)
    every = torch.arange(200)
    wrong = every[mistakes(twin, every, ToyData(chunks=50).targets(every))]
    assert 32 < wrong.numel() < 200

    data = RecordingData(chunks=50)
    train(_model(), data, cfg, progress=False)
    batches = [idx for idx in data.asked if idx.numel() != 200]  # the full passes ask for all 200 indices
    sampler = EpochSampler(200, 64, cfg.seed, "cpu")
    assert [b.numel() for b in batches] == [64, 64, 64 + 32, 8 + 32]  # step 3 ends the epoch: 200 = 3 x 64 + 8
    for step, batch in enumerate(batches):
        drawn = sampler.indices(step)
        assert torch.equal(batch[: drawn.numel()], drawn)
        if step >= 2:
            assert torch.equal(batch[drawn.numel() :], focus_indices(wrong, step, 32))


class StopAtStep(Callback):
    def __init__(self, step):
        self.step = step

    def on_log(self, row):
        return row["step"] >= self.step


def _logged(run_dir):
    with (run_dir / LOG_NAME).open() as f:
        return [(row["step"], row["loss"], row["full_accuracy"]) for row in csv.DictReader(f)]


def test_a_run_resumed_at_a_full_pass_focuses_on_the_same_indices(tmp_path):
    """Stopped at step 4 (a full pass) and resumed, a focused run logs the uninterrupted run's losses."""
    cfg = TrainConfig(batch_size=32, steps=10, lr=1e-2, warmup_steps=1, eval_every=2, focus=0.5, log_every=1)
    train(_model(), ToyData(chunks=40), cfg, tmp_path / "full", progress=False)
    train(_model(), ToyData(chunks=40), cfg, tmp_path / "part", progress=False, callbacks=[StopAtStep(4)])
    model, state, _, _ = load_run(tmp_path / "part")
    assert state["step"] == 4
    train(model, ToyData(chunks=40), cfg, tmp_path / "part", resume=True, progress=False)
    assert _logged(tmp_path / "part") == _logged(tmp_path / "full")
    unfocused = TrainConfig(**{**cfg.__dict__, "focus": 0.0})
    train(_model(), ToyData(chunks=40), unfocused, tmp_path / "plain", progress=False)
    assert _logged(tmp_path / "plain")[4:] != _logged(tmp_path / "full")[4:]  # focus changed the run


def test_focus_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setattr(train_module.distributed, "rank_and_world_size", lambda: (0, 2))
    cfg = TrainConfig(batch_size=32, steps=2, eval_every=1, focus=0.5)
    with pytest.raises(ValueError, match="focus trains one process only"):
        train(_model(), ToyData(chunks=40), cfg, progress=False)
