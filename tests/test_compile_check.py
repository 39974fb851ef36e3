"""Every kernel compiles for a Hopper GPU (sm_90a) within its shared memory, with no GPU needed (H = 16, 64 and
128; vocab 50,257; at the seed model both weight-gradient candidates and both sigmoids too), under the Triton the
lent GPU runs (CI's second stage installs it): that compile is the one a device session pays for. One test per
configuration, so that pytest-xdist spreads the ~30-60 s compiles over its workers."""

import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
import triton  # noqa: E402

LENT_GPU_TRITON = "3.6."  # .ci/run's second stage pins the lent GPU's versions: torch 2.11, Triton 3.6
pytestmark = pytest.mark.skipif(
    not triton.__version__.startswith(LENT_GPU_TRITON),
    reason=f"compiles as the lent GPU does, with Triton {LENT_GPU_TRITON}x (CI's second stage); "
    f"this is Triton {triton.__version__}",
)

COLUMNS = (
    "config",
    "precision",
    "sigmoid",
    "path",
    "kernel",
    "warps",
    "registers",
    "spills",
    "stack",
    "shared",
    "instructions",
    "loop",
    "mufu",
    "mma",
    "verdict",
)


def compile_report(tmp_path, config: str, defaults_only: bool) -> list[dict[str, str]]:
    """compile_check's table for one configuration in fp32 and bf16, as rows of named cells."""
    table = tmp_path / "report.md"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "aunn_fast.bench.compile_check",
            "--configs",
            config,
            "--precisions",
            "fp32,bf16",
            "--out",
            str(table),
            *(["--defaults-only"] if defaults_only else []),
        ],
        capture_output=True,
        text=True,
    )
    assert table.exists(), run.stderr[-2000:]
    return [
        dict(zip(COLUMNS, (cell.strip() for cell in line.split("|")[1:-1])))
        for line in table.read_text().splitlines()[2:]
        if line.startswith("|")
    ]


@pytest.mark.parametrize("config", ["seed", "narrow", "bytes", "vocab"])
def test_default_paths_compile_for_hopper(tmp_path, config):
    """The seed model's with every candidate (the sigmoids, the weight gradients), the others' defaults."""
    rows = compile_report(tmp_path, config, defaults_only=config != "seed")
    # a kernel that asks for more shared memory than an H100 SM has would not launch
    failed = [r for r in rows if "FAILED" in r["verdict"] or "shared > H100" in r["verdict"]]
    assert not failed, "\n".join(map(str, failed))
    for precision in ("fp32", "bf16"):
        kernels = {r["kernel"] for r in rows if r["precision"] == precision}
        assert {"aunn_forward_kernel", "aunn_backward_kernel"} <= kernels, (precision, kernels)
    assert any(r["path"] == "backward (partials)" for r in rows) == (config == "seed")
    if config == "vocab":  # 50,257 at 64 rows: the head split into vocabulary ranges, dL/dh by head_dh_kernel
        few_rows = {r["kernel"] for r in rows if r["path"].endswith("few rows")}
        assert {"aunn_forward_kernel", "head_dh_kernel"} <= few_rows
    if config == "seed":
        assert "head_weight_grad_kernel" in {r["kernel"] for r in rows}

        def forward(sigmoid: str) -> dict[str, str]:
            key = ("bf16", sigmoid, "forward argmax")
            (row,) = [r for r in rows if (r["precision"], r["sigmoid"], r["path"]) == key]
            assert int(row["mma"]) > 0  # the layers' products run on tensor cores
            assert 0 < int(row["loop"]) < int(row["instructions"])
            return row

        exact, tanh = forward("exact"), forward("tanh")
        # tanh.approx is one special-function op per element where exp + reciprocal are two, with range fix-ups
        assert int(tanh["mufu"]) < 0.6 * int(exact["mufu"])
        assert int(tanh["loop"]) < 0.7 * int(exact["loop"])
