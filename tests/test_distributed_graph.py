"""A data-parallel step captured in one CUDA graph, its NCCL all-reduce inside, does what the eager step does.

The GPU tests run on one GPU in a world-size-1 NCCL group made in this process, and, where there are two GPUs,
in 2 spawned processes. Where a step cannot be captured (the CPU, gloo), the steps run eagerly, as before. On
the CPU, DataParallel.step's graphed branch (statuses sent through the graph, a failed rank still replaying)
runs with a stand-in for the graph whose replay runs the captured step's code eagerly.
"""

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aunn_fast import AUNNConfig, distributed
from aunn_fast.cuda_graph import GraphedTrainStep
from aunn_fast.data import ToyData
from aunn_fast.sampler import EpochSampler
from aunn_fast.train import TrainConfig, train, training_optimizer

from helpers import random_model, rel_err

needs_nccl = pytest.mark.skipif(
    not (torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()),
    reason="capturing an NCCL all-reduce needs CUDA and NCCL",
)

# 40 chunks = 160 indices: batches of 48, 48, 48 and 16 per epoch, the short one an eager step between replays
CHUNKS, BATCH, STEPS = 40, 48, 8
LOSS_TOLERANCE, PARAM_TOLERANCE = 1e-5, 1e-4  # fp32: the same sums, in another order at most


def _config(**kwargs):
    return TrainConfig(batch_size=BATCH, steps=STEPS, lr=3e-3, log_every=1, **kwargs)


def _model(backend="reference", device="cuda"):
    """A model with random biases and gains, the same for every call."""
    cfg = AUNNConfig(vocab_size=4, hidden=32, layers=4)
    return random_model(cfg, torch.Generator().manual_seed(7), backend=backend, precision="fp32").to(device)


@contextlib.contextmanager
def _one_process_group(store_path, backend="nccl"):
    """This process as rank 0 of a world of 1 (a FileStore rendezvous), left at the end."""
    device = torch.device("cuda", 0) if backend == "nccl" else None
    if device is not None:
        torch.cuda.set_device(device)
    store = dist.FileStore(str(store_path), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1, device_id=device)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _counted_all_reduces(monkeypatch):
    """Counts the all-reduces called while capturing a graph and outside one."""
    counts = {"captured": 0, "eager": 0}
    all_reduce = dist.all_reduce

    def counting(*args, **kwargs):
        counts["captured" if torch.cuda.is_current_stream_capturing() else "eager"] += 1
        return all_reduce(*args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counting)
    yield counts
    monkeypatch.setattr(dist, "all_reduce", all_reduce)


@needs_nccl
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_graphed_data_parallel_steps_match_eager_ones(tmp_path, monkeypatch, backend):
    """The captured step holds the one all-reduce (called once, while capturing; a replayed step calls none from
    the host, a short batch's eager step one) and gives the eager steps' losses and parameters; the buffer,
    poisoned after capture, is rewritten whole by every replay."""
    data = ToyData(CHUNKS)
    results = {}
    with _one_process_group(tmp_path / "store"):
        for cuda_graph in (False, True):
            model = _model(backend)
            optimizer = training_optimizer(model, _config())  # AdamW, capturable, its lr a device tensor
            sampler = EpochSampler(data.length, BATCH, 0, model.device)
            with _counted_all_reduces(monkeypatch) as counts:
                parallel = distributed.DataParallel(
                    model, optimizer, sampler, data, lambda: False, 1.0, cuda_graph=cuda_graph
                )
                assert parallel.eager_reason is None and (parallel.graphed is not None) == cuda_graph
                at_capture = dict(counts)
                parallel.buffer.fill_(float("nan"))
                losses = [parallel.step(step)[2].item() for step in range(STEPS)]
                parallel.release()
            steps_called = counts["eager"] - at_capture["eager"]
            if cuda_graph:
                assert at_capture["captured"] == counts["captured"] == 1
                assert steps_called == 2  # steps 3 and 7, the epochs' short batches of 16
            else:
                assert counts["captured"] == 0 and steps_called == STEPS
            results[cuda_graph] = losses, [p.detach().clone() for p in model.parameters()]
    (eager_losses, eager_params), (graph_losses, graph_params) = results[False], results[True]
    for step, (a, b) in enumerate(zip(graph_losses, eager_losses)):
        assert abs(a - b) <= LOSS_TOLERANCE * abs(b), (step, a, b)
    for a, b in zip(graph_params, eager_params):
        assert rel_err(a, b) < PARAM_TOLERANCE


@needs_nccl
def test_training_in_a_one_process_nccl_group_matches_plain_training(tmp_path, monkeypatch):
    """train() under NCCL with 1 process (its full-size steps graphed, the all-reduce inside) logs the losses of
    train() without a process group (graphed too), and ends with its weights."""
    plain_model = _model()
    plain = train(plain_model, ToyData(CHUNKS), _config(), progress=False)
    model = _model()
    with _one_process_group(tmp_path / "store"), _counted_all_reduces(monkeypatch) as counts:
        rows = train(model, ToyData(CHUNKS), _config(), tmp_path / "run", progress=False)
    assert counts["captured"] == 1
    assert [int(r["step"]) for r in rows] == [int(r["step"]) for r in plain] == list(range(1, STEPS + 1))
    for got, expected in zip(rows, plain):
        assert abs(got["loss"] - expected["loss"]) <= LOSS_TOLERANCE * abs(expected["loss"]), (got, expected)
    for a, b in zip(model.parameters(), plain_model.parameters()):
        assert rel_err(a, b) < PARAM_TOLERANCE


@needs_nccl
def test_an_optimizer_that_cannot_be_captured_runs_eagerly(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # not capturable
    data = ToyData(CHUNKS)
    with _one_process_group(tmp_path / "store"):
        sampler = EpochSampler(data.length, BATCH, 0, model.device)
        parallel = distributed.DataParallel(model, optimizer, sampler, data, lambda: False, cuda_graph=True)
        assert parallel.graphed is None and "not capturable" in parallel.eager_reason
        assert torch.isfinite(parallel.step(0)[2])


def test_steps_on_the_cpu_run_eagerly(tmp_path):
    """gloo on the CPU: nothing is captured, and the reason says why (CI's check of the fallback)."""
    data = ToyData(CHUNKS)
    model = _model(device="cpu")
    with _one_process_group(tmp_path / "store", backend="gloo"):
        sampler = EpochSampler(data.length, BATCH, 0, "cpu")
        optimizer = training_optimizer(model, _config())
        parallel = distributed.DataParallel(model, optimizer, sampler, data, lambda: False, cuda_graph=True)
        assert parallel.graphed is None and parallel.eager_reason == "the model is not on CUDA"
        assert torch.isfinite(parallel.step(0)[2])


class ReplayedEagerly(GraphedTrainStep):
    """A GraphedTrainStep that captures nothing: each replay runs the step's code (loss_fn, backward, reduce,
    clipping, optimizer step) eagerly on the inputs last loaded, so that the graphed branch of
    DataParallel.step runs on the CPU."""

    def __init__(self, model, optimizer, batch_size, clip_grad_norm=None, loss_fn=None, reduce=None):
        self.model, self.optimizer, self.batch_size, self.clip_grad_norm = model, optimizer, batch_size, clip_grad_norm
        self.loss_fn, self.reduce = loss_fn, reduce
        self.idx = torch.zeros(batch_size, dtype=torch.int64, device=model.device)
        self.targets = torch.zeros(batch_size, dtype=torch.int64, device=model.device)
        self.captured_with, self.captured_state = self._settings(), optimizer.state
        self.captured_addresses = self._param_addresses()
        self.replays = 0

    def _settings(self):
        """Without the learning rate: on the CPU a float, which the schedule changes (a device tensor on CUDA)."""
        return self.model.backend, self.model.precision

    def replay(self):
        self.replays += 1
        self.optimizer.zero_grad(set_to_none=False)
        return self._one_step()

    def release(self):
        pass


def _replay_eagerly(patch):
    """Make DataParallel "capture" its steps on the CPU, as ReplayedEagerly; ``patch(owner, name, value)``."""
    patch(distributed, "GraphedTrainStep", ReplayedEagerly)
    patch(distributed.DataParallel, "_graph_unsupported", lambda self, share: None)


def test_the_graphed_branch_steps_like_the_eager_one(tmp_path, monkeypatch):
    """On the CPU (gloo, 1 process) with the stand-in graph: full-size steps replay, short ones run eagerly,
    the losses and weights are the eager steps', and a Ctrl-C sent through the graph's status slot is agreed."""
    _replay_eagerly(monkeypatch.setattr)
    data = ToyData(CHUNKS)
    results, current = {}, [0]

    def pressed():
        return current[0] == 5

    with _one_process_group(tmp_path / "store", backend="gloo"):
        for cuda_graph in (False, True):
            model = _model(device="cpu")
            optimizer = training_optimizer(model, _config())
            sampler = EpochSampler(data.length, BATCH, 0, "cpu")
            parallel = distributed.DataParallel(model, optimizer, sampler, data, pressed, 1.0, cuda_graph=cuda_graph)
            assert (parallel.graphed is not None) == cuda_graph
            parallel.buffer.fill_(float("nan"))
            losses, agreed = [], []
            for step in range(STEPS):
                current[0] = step
                losses.append(parallel.step(step)[2].item())
                agreed.append(parallel.stop_agreed())
            assert agreed == [step == 5 for step in range(STEPS)]  # interrupted in step 5, a replayed one
            if cuda_graph:
                assert parallel.graphed.replays == STEPS - 2  # all but the epochs' short batches (steps 3, 7)
            results[cuda_graph] = losses, [p.detach().clone() for p in model.parameters()]
    (eager_losses, eager_params), (graph_losses, graph_params) = results[False], results[True]
    for step, (a, b) in enumerate(zip(graph_losses, eager_losses)):
        assert abs(a - b) <= LOSS_TOLERANCE * abs(b), (step, a, b)
    for a, b in zip(graph_params, eager_params):
        assert rel_err(a, b) < PARAM_TOLERANCE


def test_a_rank_whose_data_fails_still_replays(tmp_path, monkeypatch):
    """Its peers' all-reduces wait for its graph's: the step is replayed (on the inputs last loaded), its status
    slot saying it failed, before its own error is raised. (The other ranks then stop as after an eager step's
    failure, tests/test_distributed.py.)"""
    _replay_eagerly(monkeypatch.setattr)
    data = ToyData(CHUNKS)
    targets, current = data.targets, [0]

    def failing_targets(idx):
        if current[0] == 5:  # a full-size step
            raise RuntimeError("simulated failure")
        return targets(idx)

    data.targets = failing_targets
    with _one_process_group(tmp_path / "store", backend="gloo"):
        model = _model(device="cpu")
        sampler = EpochSampler(data.length, BATCH, 0, "cpu")
        parallel = distributed.DataParallel(
            model, training_optimizer(model, _config()), sampler, data, lambda: False, cuda_graph=True
        )
        for step in range(5):
            parallel.step(step)
        replays = parallel.graphed.replays
        current[0] = 5
        with pytest.raises(RuntimeError, match="simulated failure"):
            parallel.step(5)
        assert parallel.graphed.replays == replays + 1
        assert parallel.status.tolist() == [distributed.FAILED]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, out):
    """One spawned rank on GPU ``rank``: trains with its steps graphed, saves its rows and final weights."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    launch = distributed.launch_from_env()
    device = distributed.rank_device(launch, "cuda")
    distributed.init(launch, device)
    try:
        model = _model(device=device)
        rows = train(model, ToyData(CHUNKS), _config(), progress=False)
    finally:
        distributed.shutdown()
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    torch.save([p.detach().cpu() for p in model.parameters()], Path(out, f"rank{rank}.pt"))


@needs_nccl
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_processes_with_graphed_steps_train_like_one(tmp_path):
    """2 ranks on 2 GPUs, each step's all-reduce replayed from their graphs: the 1-process losses, and both
    replicas end with the 1-process weights."""
    plain_model = _model()
    plain = train(plain_model, ToyData(CHUNKS), _config(), progress=False)
    mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        rows = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for got, expected in zip(rows, plain, strict=True):
            assert abs(got["loss"] - expected["loss"]) <= LOSS_TOLERANCE * abs(expected["loss"]), (rank, got)
        for a, b in zip(torch.load(tmp_path / f"rank{rank}.pt"), plain_model.parameters()):
            assert rel_err(a, b.cpu()) < PARAM_TOLERANCE
