"""Data-parallel training on the CPU with gloo, 2 processes: the same run as 1 process, resumable across world
sizes, and stopped on every rank when one fails or is interrupted."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from aunn_fast import AUNN, AUNNConfig, distributed
from aunn_fast.cli import main
from aunn_fast.data import ToyData
from aunn_fast.sampler import EpochSampler
from aunn_fast.train import CHECKPOINT_NAME, LOG_NAME, TrainConfig, load_run, read_log, train

from helpers import random_indices, random_model, rel_err

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

# 40 chunks = 160 indices; batches of 33 split 16 + 17 between 2 ranks, and an epoch ends with a batch of 28
CHUNKS, BATCH = 40, 33
LOSS_TOLERANCE = 1e-5  # relative: fp32 sums in another order, through a few AdamW steps


def _model(backend="reference"):
    return AUNN(AUNNConfig(vocab_size=4, hidden=16, layers=4), backend=backend, seed=0)


def _config(steps, **kwargs):
    return TrainConfig(batch_size=BATCH, steps=steps, lr=3e-3, log_every=1, **kwargs)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, run_dir, steps, resume, fault):
    """One spawned rank: joins the gloo group, trains, and writes what happened to run_dir/../rank{rank}.json."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    result = {"rows": [], "error": None}
    distributed.init(distributed.launch_from_env(), "cpu")
    try:
        data, model = ToyData(chunks=CHUNKS), _model()
        if fault is not None and fault["rank"] == rank:
            targets, calls = data.targets, [0]

            def faulty_targets(idx):
                calls[0] += 1
                if calls[0] == fault["call"]:
                    if fault["kind"] == "error":
                        raise RuntimeError("simulated failure on one rank")
                    os.kill(os.getpid(), signal.SIGINT)
                return targets(idx)

            data.targets = faulty_targets
        result["rows"] = train(model, data, _config(steps, save_every=2), run_dir, resume=resume, progress=False)
    except BaseException as exc:  # noqa: B036 (KeyboardInterrupt included: recorded for the test to check)
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        distributed.shutdown()
    (Path(run_dir).parent / f"rank{rank}.json").write_text(json.dumps(result))


def _spawn(run_dir, steps, resume=False, fault=None, world_size=2):
    """Train in world_size spawned processes; returns each rank's {"rows", "error"}."""
    mp.start_processes(
        _rank_main,
        args=(world_size, _free_port(), str(run_dir), steps, resume, fault),
        nprocs=world_size,
        start_method="spawn",
    )
    return [json.loads((run_dir.parent / f"rank{r}.json").read_text()) for r in range(world_size)]


def _losses(rows):
    return [(int(r["step"]), r["loss"]) for r in rows]


def _assert_same_losses(got, expected):
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (step, a), (_, b) in zip(got, expected):
        assert abs(a - b) <= LOSS_TOLERANCE * abs(b), (step, a, b)


@pytest.fixture(scope="module")
def one_process_rows():
    """The 1-process run of 8 steps (two epochs' worth: 5 steps of 33, 33, 33, 33, 28 indices, then 3 more)."""
    return train(_model(), ToyData(chunks=CHUNKS), _config(8), progress=False)


def test_torchrun_runs_one_run_that_resumes_on_one_process(tmp_path, one_process_rows):
    """`torchrun --nproc-per-node 2 -m aunn_fast train`: rank 0 alone writes the log and checkpoint (with world
    size 2), whose losses are the 1-process run's; the run then resumes as 1 process, and goes on like it."""
    out = tmp_path / "run"
    argv = [
        "train",
        "--data",
        f"toy:{CHUNKS}",
        "--out",
        str(out),
        "--hidden",
        "16",
        "--layers",
        "4",
        "--batch-size",
        str(BATCH),
        "--lr",
        "3e-3",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "aunn_fast",
            *argv,
            "--steps",
            "4",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.count("done: step 4") == 1  # printed by rank 0 only
    written = sorted(p.name for p in out.iterdir() if not (p.name.startswith(".") or p.name.endswith(".lock")))
    assert written == [LOG_NAME, CHECKPOINT_NAME]  # one log and one checkpoint: no per-rank files
    assert load_run(out)[1]["world_size"] == 2
    assert main([*argv, "--resume", "--steps", "8"]) == 0
    rows = read_log(out / LOG_NAME)
    assert [int(r["world_size"]) for r in rows] == [2] * 4 + [1] * 4
    assert load_run(out)[1]["world_size"] == 1
    _assert_same_losses(_losses(rows), _losses(one_process_rows))


def test_a_one_process_run_resumes_on_two(tmp_path, one_process_rows):
    run = tmp_path / "run"
    train(_model(), ToyData(chunks=CHUNKS), _config(4, save_every=2), run, progress=False)
    results = _spawn(run, steps=8, resume=True)
    assert [r["error"] for r in results] == [None, None]
    assert _losses(results[0]["rows"])[4:] == _losses(results[1]["rows"])  # rank 0's rows begin with the log's
    _assert_same_losses(_losses(results[0]["rows"]), _losses(one_process_rows))
    _assert_same_losses(_losses(read_log(run / LOG_NAME)), _losses(one_process_rows))
    model, state, _, _ = load_run(run)
    assert (state["step"], state["world_size"]) == (8, 2)
    reference = _model()
    train(reference, ToyData(chunks=CHUNKS), _config(8), progress=False)
    assert max(rel_err(a, b) for a, b in zip(model.params, reference.params)) < 1e-5


def test_a_failing_rank_stops_every_rank_and_keeps_the_last_checkpoint(tmp_path):
    """Rank 1 fails in its 5th step: it raises its own error, rank 0 says which rank failed; the checkpoint of
    step 4 stays, complete."""
    run = tmp_path / "run"
    results = _spawn(run, steps=8, fault={"rank": 1, "call": 5, "kind": "error"})
    assert results[1]["error"] == "RuntimeError: simulated failure on one rank"
    assert results[0]["error"].startswith("RankFailed: rank 1 failed in step 5")
    _, state, _, _ = load_run(run)
    assert state["step"] == 4 and [int(r["step"]) for r in read_log(run / LOG_NAME)] == [1, 2, 3, 4]


def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGINT reaches rank 1 during its 3rd step: every rank completes that step (whose all-reduce tells them),
    then stops, and rank 0 saves the checkpoint of step 3."""
    run = tmp_path / "run"
    results = _spawn(run, steps=8, fault={"rank": 1, "call": 3, "kind": "sigint"})
    assert [r["error"] for r in results] == ["KeyboardInterrupt: ", "KeyboardInterrupt: "]
    assert load_run(run)[1]["step"] == 3 and [int(r["step"]) for r in read_log(run / LOG_NAME)] == [1, 2, 3]


@pytest.mark.parametrize("backend", ["reference", "compile", "triton"])
def test_every_backend_packs_its_gradients_for_the_all_reduce(backend):
    """The buffer each rank all-reduces holds its share's gradients of the global batch's mean loss: the sum of
    the two ranks' buffers is the 1-process gradient (the reference's), for every backend, so no path can skip
    the reduction. (Equal shares: torch.compile compiles one shape.)"""
    generator = torch.Generator().manual_seed(5)
    cfg = AUNNConfig(vocab_size=5, hidden=16, layers=3)
    model = random_model(cfg, generator, backend=backend)
    idx = random_indices(44, 64, generator)
    targets = torch.randint(0, 5, (44,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    parallel = distributed.DataParallel(model, optimizer, EpochSampler(44, 44, 0, "cpu"), ToyData(), lambda: False)
    packed = parallel.buffer[:-1]  # the gradients and the loss; the last slot is rank 0's status
    summed = torch.zeros_like(packed)
    for share in (slice(0, 22), slice(22, 44)):
        packed.fill_(float("nan"))  # poisoned: pack must write every gradient and the loss
        parallel.pack(idx[share], targets[share], global_batch_size=44)
        summed += packed
    reference = AUNN(cfg, backend="reference")
    reference.load_params(model.params._asdict())
    loss = reference.loss(idx, targets)
    loss.backward()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()] + [loss.detach().reshape(1)])
    assert rel_err(summed, expected) < 1e-5


def test_launch_variables_are_checked():
    assert distributed.launch_from_env({}) is None
    launch = distributed.launch_from_env(
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    )
    assert launch == distributed.Launch(rank=1, world_size=2, local_rank=1)
    with pytest.raises(ValueError, match="not MASTER_ADDR"):
        distributed.launch_from_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="inconsistent"):
        distributed.launch_from_env(
            {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
        )
    assert distributed.rank_device(launch, "cpu") == "cpu"
    with pytest.raises(ValueError, match="pass --device cuda"):
        distributed.rank_device(launch, "cuda:1")
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="local rank 1 has no GPU"):
            distributed.rank_device(launch, "cuda")


def test_a_log_written_before_the_world_size_column_resumes(tmp_path):
    """Runs logged before log.csv had world_size: their rows read as 1 process, and resuming rewrites them so."""
    run = tmp_path / "run"
    train(_model(), ToyData(chunks=CHUNKS), _config(2, save_every=2), run, progress=False)
    lines = (run / LOG_NAME).read_text().splitlines()
    (run / LOG_NAME).write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    assert "world_size" not in (run / LOG_NAME).read_text()
    model, _, _, _ = load_run(run)
    train(model, ToyData(chunks=CHUNKS), _config(3), run, resume=True, progress=False)
    rows = read_log(run / LOG_NAME)
    assert [(int(r["step"]), int(r["world_size"])) for r in rows] == [(1, 1), (2, 1), (3, 1)]
    assert (run / LOG_NAME).read_text().splitlines()[1].endswith(",1")


def test_only_train_runs_under_torchrun(tmp_path, capsys, monkeypatch):
    for name, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }.items():
        monkeypatch.setenv(name, value)
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert "only `aunn train` runs under torchrun" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
