"""Data-parallel scaling on the CPU: 1 process x 2 threads against 2 processes x 1 thread, same global batch.

    python -m aunn_fast.bench.distributed_scaling [--config seed] [--batch 8192] [--steps 10] [--backends ...]

For each backend (eager ``reference`` and ``compile`` by default, measured in the same run), times
training steps of one global batch:

- ``plain, 1 process x T threads`` for T = 1 and 2: the trainer's ordinary step;
- ``data-parallel, 1 process x 1 thread``: the same step through aunn_fast.distributed's packed all-reduce
  (gloo, world size 1): the cost of the distributed path itself;
- ``data-parallel, 2 processes x 1 thread``: gloo, each rank half of the global batch.

Each configuration warms up (``--warmup`` steps: compilation, the epoch's order) then times ``--steps``
steps of the same epoch; the figure is rank 0's wall time per step. Printed as a markdown table with the
CPU model and the load average, which matter: on a shared machine the ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from aunn_fast import AUNN, distributed
from aunn_fast.bench.configs import CONFIGS
from aunn_fast.data import ToyData
from aunn_fast.sampler import EpochSampler
from aunn_fast.train import TrainConfig, training_optimizer


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _time_steps(
    config: str,
    backend: str,
    batch: int,
    warmup: int,
    steps: int,
    threads: int,
    rank: int = 0,
    world_size: int = 1,
    parallel: bool = False,
) -> float:
    """Seconds per step (rank 0's wall time) of ``steps`` steps after ``warmup``, in this process."""
    torch.set_num_threads(threads)
    model = AUNN(CONFIGS[config], backend=backend, seed=0)
    data = ToyData(chunks=-(-batch * (warmup + steps) // 4))  # one epoch holds every step
    optimizer = training_optimizer(model, TrainConfig(lr=1e-3))
    sampler = EpochSampler(data.length, batch, 0, "cpu", rank, world_size)
    if parallel:
        dp = distributed.DataParallel(model, optimizer, sampler, data, lambda: False)

    def step(s: int) -> None:
        if parallel:
            dp.step(s)
            return
        idx = sampler.indices(s)
        targets = data.targets(idx)
        optimizer.zero_grad()
        model.loss(idx, targets).backward()
        optimizer.step()

    for s in range(warmup):
        step(s)
    if parallel:
        torch.distributed.barrier()
    began = time.perf_counter()
    for s in range(warmup, warmup + steps):
        step(s)
    return (time.perf_counter() - began) / steps


def _rank_main(rank: int, world_size: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    distributed.init(distributed.launch_from_env(), "cpu")
    try:
        seconds = _time_steps(*args, threads=1, rank=rank, world_size=world_size, parallel=True)
    finally:
        distributed.shutdown()
    if rank == 0:
        Path(out).write_text(json.dumps(seconds))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_parallel(world_size: int, args: tuple) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds.json")
        mp.start_processes(
            _rank_main, args=(world_size, _free_port(), out, args), nprocs=world_size, start_method="spawn"
        )
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aunn_fast.bench.distributed_scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), default="seed", help="model configuration (seed)")
    parser.add_argument("--batch", type=int, default=8192, help="global batch (8192)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (10)")
    parser.add_argument("--backends", default="reference,compile", help="comma-separated (reference,compile)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    print(
        f"{_cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}; config {args.config}, "
        f"global batch {args.batch}, {args.steps} timed steps after {args.warmup}; "
        f"load average before {load_before[0]:.2f}"
    )
    print("| backend | configuration | ms / step | M idx/s | vs plain 1 x 2 threads |")
    print("|---|---|---|---|---|")
    for backend in args.backends.split(","):
        common = (args.config, backend, args.batch, args.warmup, args.steps)
        rows = {
            "plain, 1 process x 1 thread": _time_steps(*common, threads=1),
            "plain, 1 process x 2 threads": _time_steps(*common, threads=2),
            "data-parallel, 1 process x 1 thread": _data_parallel(1, common),
            "data-parallel, 2 processes x 1 thread": _data_parallel(2, common),
        }
        base = rows["plain, 1 process x 2 threads"]
        for name, seconds in rows.items():
            print(
                f"| {backend} | {name} | {seconds * 1e3:.1f} | {args.batch / seconds / 1e6:.3f} | "
                f"{base / seconds:.2f}x |"
            )
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
