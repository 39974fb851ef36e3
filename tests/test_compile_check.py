"""Every kernel, both weight-gradient candidates and both sigmoids included, compiles for a Hopper GPU
(sm_90a) within its shared memory, with no GPU needed (H = 16, 64 and 128; vocab 50,257)."""

import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")

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


def test_default_paths_compile_for_hopper(tmp_path):
    table = tmp_path / "report.md"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "aunn_fast.bench.compile_check",
            "--configs",
            "seed,narrow,bytes,vocab",
            "--precisions",
            "fp32,bf16",
            "--out",
            str(table),
        ],
        capture_output=True,
        text=True,
    )
    assert table.exists(), run.stderr[-2000:]
    rows = [
        dict(zip(COLUMNS, (cell.strip() for cell in line.split("|")[1:-1])))
        for line in table.read_text().splitlines()[2:]
        if line.startswith("|")
    ]
    # a kernel that asks for more shared memory than an H100 SM has would not launch
    failed = [r for r in rows if "FAILED" in r["verdict"] or "shared > H100" in r["verdict"]]
    assert not failed, "\n".join(map(str, failed))
    assert {"aunn_forward_kernel", "aunn_backward_kernel", "head_weight_grad_kernel"} <= {r["kernel"] for r in rows}
    assert any(r["path"] == "backward (partials)" for r in rows)
    # vocab 50,257 at 64 rows: the head split into vocabulary ranges, dL/dh by head_dh_kernel
    assert {"aunn_forward_kernel", "head_dh_kernel"} <= {r["kernel"] for r in rows if r["path"].endswith("few rows")}

    def forward(sigmoid: str) -> dict[str, str]:
        (row,) = [
            r
            for r in rows
            if (r["config"], r["precision"], r["sigmoid"], r["path"]) == ("seed", "bf16", sigmoid, "forward argmax")
        ]
        assert int(row["mma"]) > 0  # the layers' products run on tensor cores
        assert 0 < int(row["loop"]) < int(row["instructions"])
        return row

    exact, tanh = forward("exact"), forward("tanh")
    # tanh.approx is one special-function op per element where exp + reciprocal are two, with range fix-ups
    assert int(tanh["mufu"]) < 0.6 * int(exact["mufu"])
    assert int(tanh["loop"]) < 0.7 * int(exact["loop"])
