"""docs/kernels.md stays the reference of the kernels' configuration: every KernelOptions field, every
environment switch and every option of the candidate benchmark and of the compile report appear in it."""

import re
from dataclasses import fields
from pathlib import Path

from aunn_fast.kernels.config import ENVIRONMENT, KernelOptions

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "kernels.md").read_text()


def test_every_option_and_switch_is_documented():
    assert not [f.name for f in fields(KernelOptions) if f"`{f.name}`" not in DOC]
    assert not [variable for variable in ENVIRONMENT.values() if f"`{variable}`" not in DOC]


def test_every_benchmark_flag_is_documented():
    for script in ("kernel_variants", "compile_check"):
        source = (ROOT / "bench" / f"{script}.py").read_text()
        flags = re.findall(r'add_argument\(\s*"(--[\w-]+)"', source)
        assert flags, f"no options found in bench/{script}.py"
        assert f"aunn_fast.bench.{script}" in DOC
        assert not [flag for flag in flags if flag not in DOC], script
