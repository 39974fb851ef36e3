"""Every kernel, both weight-gradient candidates included, compiles for a Hopper GPU (sm_90a), with no GPU needed."""
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")


def test_default_paths_compile_for_hopper(tmp_path):
    table = tmp_path / "report.md"
    run = subprocess.run([sys.executable, "-m", "aunn_fast.bench.compile_check", "--configs", "seed,narrow",
                          "--precisions", "fp32,bf16", "--out", str(table)], capture_output=True, text=True)
    assert table.exists(), run.stderr[-2000:]
    rows = [line for line in table.read_text().splitlines()[2:] if line.startswith("|")]
    kernels = {line.split("|")[4].strip() for line in rows}
    assert {"aunn_forward_kernel", "aunn_backward_kernel", "head_weight_grad_kernel"} <= kernels
    assert any("backward (partials)" in line for line in rows)
    failed = [line for line in rows if "FAILED" in line]
    assert not failed, "\n".join(failed)
