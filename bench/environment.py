"""Where a run happened: device name, library versions, commit and date."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def device_name(device: torch.device) -> str:
    """The CUDA card's name, or the CPU model from /proc/cpuinfo with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """The environment variable AUNN_FAST_COMMIT where set (a lent GPU machine gets a copy of the working
    tree whose repository may be an older snapshot: one reported the session's first commit "+dirty"
    while the tree held four later ones); else HEAD of the repository this file lives in, with "+dirty"
    when tracked files differ from it (the figures then come from code no commit holds); else None."""
    if os.environ.get("AUNN_FAST_COMMIT"):
        return os.environ["AUNN_FAST_COMMIT"]
    head = _git("rev-parse", "HEAD")
    if head is None:
        return None
    return head + "+dirty" if _git("status", "--porcelain", "--untracked-files=no") else head


def describe(device: torch.device) -> dict[str, Any]:
    """The meta fields of results.json."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # 1-minute load average when the run started: other processes skew CPU timings.
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def default_out_dir(device: torch.device) -> Path:
    """bench/results/<card>-<date>, the card's name reduced to a path-safe slug."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return REPO_ROOT / "bench" / "results" / f"{slug}-{datetime.date.today().isoformat()}"
