"""Test setup: Triton kernels run in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh, randomly seeded generator: every run draws new inputs (the seed is printed on failure)."""
    g = torch.Generator()
    seed = int.from_bytes(os.urandom(4), "little")
    g.manual_seed(seed)
    print(f"generator seed: {seed}")
    return g
