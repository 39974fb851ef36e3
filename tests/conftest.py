"""Test setup: Triton kernels run in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here.
"""

import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # fp32 kernels multiply with FMAs here: the interpreter's emulation of the GPU default, tf32x3 (three
    # products per dot), made the suite a third slower; the tests of tf32x3 select it themselves.
    os.environ.setdefault("AUNN_FAST_FP32_PRODUCTS", "ieee")
    # In the interpreter the kernels are opaque custom ops, as are the C++ extension's operators, which
    # Inductor's on-disk caches do not look inside: a graph compiled against earlier kernels or operators
    # would be reused and fail. So the cache is kept per version of the package's sources, C++ included
    # (on a GPU the graph holds the kernels), and per ATEN_CPU_CAPABILITY: torch 2.13's cache served a graph
    # compiled for AVX-512 to a run forced to AVX2 (tests/test_cpp.py's compile test then read a wrong loss,
    # and the other way round crashed).
    root = Path(__file__).parents[1]
    sources = sorted([*root.glob("aunn_fast/*.py"), *root.glob("kernels/*.py"), *root.glob("csrc/*/*")])
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").encode()
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + capability).hexdigest()[:16]
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"aunn_inductor_{digest}"))
    # Imported here, under the variable: triton.language's own jit functions (tl.sum, ...) become interpretable
    # only when triton is first imported with it set, and a test that unsets it (to check the refusal) would
    # otherwise be a worker's first importer and break the kernels of every later test on that worker.
    try:
        import triton  # noqa: F401
    except ImportError:
        pass


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh, randomly seeded generator: every run draws new inputs (the seed is printed on failure)."""
    g = torch.Generator()
    seed = int.from_bytes(os.urandom(4), "little")
    g.manual_seed(seed)
    print(f"generator seed: {seed}")
    return g
