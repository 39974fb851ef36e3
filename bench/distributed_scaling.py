"""Data-parallel overhead and scaling: the distributed step against the trainer's own, same global batch.

    python -m aunn_fast.bench.distributed_scaling [--device cpu] [--config seed] [--batch 8192] [--steps 10]
    python -m aunn_fast.bench.distributed_scaling --device cuda [--batch 1048576] [--backends triton]

On the CPU (``--device cpu``), for each backend (eager ``reference`` and ``compile`` by default, measured
in the same run), times training steps of one global batch:

- ``plain, 1 process x T threads`` for T = 1 and 2: the trainer's ordinary step;
- ``data-parallel, 1 process x 1 thread``: the same step through aunn_fast.distributed's packed all-reduce
  (gloo, world size 1, in this process like the plain rows): the cost of the distributed path itself;
- ``data-parallel, 2 processes x 1 thread``: gloo, each rank half of the global batch.

On one GPU (``--device cuda``; batch 1,048,576 and the ``triton`` backend by default), the cost of the
distributed path itself, 1 process in an NCCL group of 1 against the plain trainer, each with its full-size
steps replayed from a captured CUDA graph (the data-parallel one with its all-reduce inside) and eager:

- ``plain, graphed`` / ``plain, eager``: the trainer's step without a process group;
- ``data-parallel, 1 process (NCCL), graphed`` / ``... eager``: aunn_fast.distributed's step.

Every step clips the gradients' norm to 1, as the trainer does by default. The issue's goal: the
data-parallel step at most 5% slower than the plain one of the same kind at batch 1M.

Each configuration warms up (``--warmup`` steps: compilation, the epoch's order) then times ``--steps``
steps of the same epoch; the figure is rank 0's wall time per step (on CUDA between two synchronisations).
Printed as a markdown table, row by row, with the CPU or GPU model and the load average, which matter: on a
shared machine the ratios are what to read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.multiprocessing as mp

from aunn_fast import AUNN, distributed
from aunn_fast.bench.configs import CONFIGS
from aunn_fast.cuda_graph import GraphedTrainStep
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
    threads: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    parallel: bool = False,
    device: str = "cpu",
    graphed: bool = False,
    clip: float | None = None,
) -> float:
    """Seconds per step (rank 0's wall time) of ``steps`` steps after ``warmup``, in this process. ``graphed``:
    full-size steps replay a captured CUDA graph (``device`` cuda); ``clip``: the gradients' norm clipped to it."""
    if threads is not None:
        torch.set_num_threads(threads)
    model = AUNN(CONFIGS[config], backend=backend, seed=0).to(device)
    data = ToyData(chunks=-(-batch * (warmup + steps) // 4))  # one epoch holds every step
    optimizer = training_optimizer(model, TrainConfig(lr=1e-3, cuda_graph=graphed))
    sampler = EpochSampler(data.length, batch, 0, device, rank, world_size)
    dp = graph = None
    if parallel:
        dp = distributed.DataParallel(model, optimizer, sampler, data, lambda: False, clip, cuda_graph=graphed)
        if graphed and dp.graphed is None:
            raise RuntimeError(f"the data-parallel step was not captured: {dp.eager_reason}")
    elif graphed:
        graph = GraphedTrainStep(model, optimizer, sampler.global_batch_size(0), clip)

    def step(s: int) -> None:
        if dp is not None:
            dp.step(s)
            return
        idx = sampler.indices(s)
        targets = data.targets(idx)
        if graph is not None:
            graph(idx, targets)
            return
        optimizer.zero_grad()
        model.loss(idx, targets).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()

    def synchronize() -> None:
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)

    try:
        for s in range(warmup):
            step(s)
        synchronize()
        if parallel:
            torch.distributed.barrier()
        began = time.perf_counter()
        for s in range(warmup, warmup + steps):
            step(s)
        synchronize()
        return (time.perf_counter() - began) / steps
    finally:
        if dp is not None:  # before the process group goes: a graph holding its all-reduce would hang that
            dp.release()


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


@contextlib.contextmanager
def _one_process_group(device: str) -> Iterator[None]:
    """This process as the only rank of a process group (NCCL on CUDA), as ``torchrun --nproc-per-node 1``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    distributed.init(distributed.Launch(rank=0, world_size=1, local_rank=0), device)
    try:
        yield
    finally:
        distributed.shutdown()


def _in_one_process_group(args: tuple) -> float:
    """The data-parallel step in a gloo group of 1 made in this process, as the plain rows are measured: a
    spawned process's steps differ from this one's by more than the distributed path costs (measured)."""
    with _one_process_group("cpu"):
        return _time_steps(*args, threads=1, parallel=True)


def _cpu_rows(args: argparse.Namespace) -> None:
    print("| backend | configuration | ms / step | M idx/s | vs plain 1 x 2 threads |")
    print("|---|---|---|---|---|")
    for backend in args.backends.split(","):
        common = (args.config, backend, args.batch, args.warmup, args.steps)
        rows = {
            "plain, 1 process x 1 thread": _time_steps(*common, threads=1),
            "plain, 1 process x 2 threads": _time_steps(*common, threads=2),
            "data-parallel, 1 process x 1 thread": _in_one_process_group(common),
            "data-parallel, 2 processes x 1 thread": _data_parallel(2, common),
        }
        base = rows["plain, 1 process x 2 threads"]
        for name, seconds in rows.items():
            print(
                f"| {backend} | {name} | {seconds * 1e3:.1f} | {args.batch / seconds / 1e6:.3f} | "
                f"{base / seconds:.2f}x |"
            )


def _cuda_rows(args: argparse.Namespace) -> None:
    """The data-parallel step in an NCCL group of 1 against the plain one, graphed then eager, each row printed
    as soon as measured (a timeout still leaves the first)."""
    device = "cuda:0"
    print("| backend | configuration | ms / step | M idx/s | vs plain of the same kind |")
    print("|---|---|---|---|---|", flush=True)
    for backend in args.backends.split(","):
        common = (args.config, backend, args.batch, args.warmup, args.steps)
        for graphed in (True, False):
            kind = "graphed" if graphed else "eager"
            plain = _time_steps(*common, device=device, graphed=graphed, clip=1.0)
            with _one_process_group(device):
                parallel = _time_steps(*common, parallel=True, device=device, graphed=graphed, clip=1.0)
            for name, seconds in ((f"plain, {kind}", plain), (f"data-parallel, 1 process (NCCL), {kind}", parallel)):
                print(
                    f"| {backend} | {name} | {seconds * 1e3:.3f} | {args.batch / seconds / 1e6:.1f} | "
                    f"{(seconds / plain - 1) * 100:+.1f}% |",
                    flush=True,
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aunn_fast.bench.distributed_scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (gloo) or cuda (NCCL)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="seed", help="model configuration (seed)")
    parser.add_argument("--batch", type=int, help="global batch (8192 on the CPU, 1048576 on CUDA)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (10)")
    parser.add_argument("--backends", help="comma-separated (reference,compile on the CPU, triton on CUDA)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    args.batch = args.batch or (1 << 20 if cuda else 8192)
    args.backends = args.backends or ("triton" if cuda else "reference,compile")
    load_before = os.getloadavg()
    hardware = f"{torch.cuda.get_device_name()}, CPU {_cpu_model()}" if cuda else _cpu_model()
    print(
        f"{hardware}, {os.cpu_count()} logical CPUs, torch {torch.__version__}; config {args.config}, "
        f"global batch {args.batch}, {args.steps} timed steps after {args.warmup}; "
        f"load average before {load_before[0]:.2f}"
    )
    (_cuda_rows if cuda else _cpu_rows)(args)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
