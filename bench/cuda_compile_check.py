"""Compile the C++ extension's CUDA kernels (``csrc/cuda/*.cu``) for Hopper with the machine's nvcc; no GPU needed.

    python -m aunn_fast.bench.compile_check --cuda [--arch sm_90a] [--out FILE]

Each ``.cu`` file is compiled to a cubin with ``-Xptxas -v``; ptxas's report gives, per kernel, registers per
thread, spill stores and loads, stack frame and static shared memory, printed as a markdown table (as
compile_check does for the Triton kernels). Exit status 0 when every file compiled, 1 otherwise. A report is
kept under the C++ extension's build cache (``AUNN_FAST_CPP_CACHE``), keyed by nvcc's version, the target, the
file and every header beside it, so an unchanged file is not compiled twice (the fused step takes ~1-2 minutes
on 2 cores; CI checks it in two stages).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from aunn_fast.cpp_build import cache_root, source_dir

COLUMNS = ("file", "kernel", "registers", "spill stores", "spill loads", "stack", "shared", "verdict")
H100_SHARED_PER_BLOCK = 227 * 1024  # the most shared memory one block may use on an H100
NVCC_FLAGS = ("-O3", "-Xptxas", "-v")

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(report: str) -> list[dict[str, int | str]]:
    """ptxas -v output -> one dict per kernel: kernel, registers, spill stores/loads, stack, shared (bytes)."""
    kernels: list[dict[str, int | str]] = []
    for line in report.splitlines():
        if (entry := _ENTRY.search(line)) is not None:
            kernels.append(
                {"kernel": entry.group(1), "registers": 0, "spill stores": 0, "spill loads": 0, "stack": 0, "shared": 0}
            )
        elif kernels and (frame := _FRAME.search(line)) is not None:
            kernels[-1].update(
                {"stack": int(frame.group(1)), "spill stores": int(frame.group(2)), "spill loads": int(frame.group(3))}
            )
        elif kernels and (used := _USED.search(line)) is not None:
            kernels[-1]["registers"] = int(used.group(1))
            if (smem := _SMEM.search(line)) is not None:
                kernels[-1]["shared"] = int(smem.group(1))
    return kernels


def _compile_key(source: Path, arch: str, nvcc: str) -> str:
    """A digest of what the report depends on: nvcc's version, the command, the file and its folder's headers."""
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256("\0".join((version, arch, " ".join(NVCC_FLAGS), source.name)).encode())
    for path in [source, *sorted(p for p in source.parent.iterdir() if p.suffix in (".h", ".cuh"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:24]


def compile_file(source: Path, arch: str, nvcc: str) -> tuple[list[dict[str, int | str]], str | None]:
    """The kernels' resource usage of one .cu file, and the compiler's error (None when it compiled)."""
    cached = cache_root() / "ptxas" / f"{source.stem}-{_compile_key(source, arch, nvcc)}.json"
    if cached.is_file():
        report, error = json.loads(cached.read_text())
        return parse_ptxas(report), error
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [nvcc, f"-arch={arch}", "-cubin", *NVCC_FLAGS, "-o", str(Path(tmp) / "out.cubin"), str(source)],
            capture_output=True,
            text=True,
        )
    report = done.stdout + done.stderr
    error = None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["nvcc failed"])[-1]
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps([report, error]))
    return parse_ptxas(report), error


def readable_name(kernel: str) -> str:
    """A mangled kernel name demangled by c++filt where it is installed, without its namespaces and arguments:
    ``fused_step_kernel<64, (aunn_cuda::StepMode)3>`` reads as ``fused_step_kernel<64, 3>``."""
    tool = shutil.which("c++filt")
    if tool is None:
        return kernel
    name = subprocess.run([tool, kernel], capture_output=True, text=True).stdout.strip() or kernel
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "").replace("(aunn_cuda::StepMode)", "")
    return re.sub(r"^(\w+::)+", "", name.split("(")[0])


def verdict(kernel: dict[str, int | str]) -> str:
    problems = []
    if kernel["spill stores"] or kernel["spill loads"]:
        problems.append("spills")
    if int(kernel["shared"]) > H100_SHARED_PER_BLOCK:
        problems.append("shared > H100")
    return ", ".join(problems) or "ok"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compile_check --cuda", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90a", help="the GPU architecture to compile for (default sm_90a)")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    nvcc = shutil.which("nvcc")
    src = source_dir()
    if nvcc is None or src is None:
        print("compile_check --cuda: " + ("nvcc is not on the PATH" if nvcc is None else "csrc/ is not installed"))
        return 1
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    failed = False
    for source in sorted((src / "cuda").glob("*.cu")):
        kernels, error = compile_file(source, args.arch, nvcc)
        if error is not None:
            failed = True
            message = error.replace("|", "/")[:200]
            lines.append(f"| {source.name} | — | — | — | — | — | — | FAILED: {message} |")
        for k in kernels:
            cells = [source.name, readable_name(str(k["kernel"])), *(str(k[c]) for c in COLUMNS[2:7]), verdict(k)]
            lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(f"CUDA kernels of {src / 'cuda'} for {args.arch}:\n{table}")
    if args.out:
        args.out.write_text(table + "\n")
    return 1 if failed else 0
