"""kernels/gemm.py: PyTorch products in the precision modes, and the batch-split weight-gradient product."""

import pytest
import torch

from aunn_fast import reference
from aunn_fast.kernels import gemm
from aunn_fast.kernels.config import KernelOptions

MIN_ROWS = KernelOptions().split_k_min_rows  # the default, 1,024


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_matmul_rounds_operands_and_keeps_an_fp32_result(precision, generator):
    a, b = torch.randn(33, 70, generator=generator), torch.randn(70, 9, generator=generator)
    want = reference.round_operand(a.double(), precision) @ reference.round_operand(b.double(), precision)
    got = gemm.matmul(a, b, precision)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("rows,splits", [(1024 * 6, 4), (1 << 20, 256), (8192, 8), (1024, 1), (2046, 1)])
def test_batch_reduced_matmul_splits_the_batch(rows, splits, generator, monkeypatch):
    """dz.T @ a summed over the rows, in power-of-two chunks of at least min_rows rows;
    with and without a leading layer dimension; the same result as one product."""
    calls = []
    original = gemm.matmul
    monkeypatch.setattr(gemm, "matmul", lambda x, y, p: calls.append(tuple(x.shape)) or original(x, y, p))
    layers_dz = torch.randn(2, rows, 16, generator=generator)
    layers_a = torch.randn(2, rows, 8, generator=generator)
    for dz, a in ((layers_dz, layers_a), (layers_dz[0], layers_a[0])):
        got = gemm.batch_reduced_matmul(dz, a, "fp32", MIN_ROWS)
        want = dz.double().transpose(-1, -2) @ a.double()
        assert got.shape == want.shape and got.dtype == torch.float32
        scale = (dz.double().abs().transpose(-1, -2) @ a.double().abs()).max()  # of the terms summed
        assert (got.double() - want).abs().max() <= 1e-5 * scale
    # one product per call: [layers x splits, 16, rows / splits], or the plain transpose without a split
    if splits > 1:
        assert calls == [(2 * splits, 16, rows // splits), (splits, 16, rows // splits)]
    else:
        assert calls == [(2, 16, rows), (16, rows)]


def test_batch_reduced_matmul_bounds_its_partials(monkeypatch):
    """A large output (the logits backward's [V, H] at vocab 50,257) has tiles enough: no split
    that would hold more than SPLIT_K_MAX_PARTIALS fp32 partial elements."""

    def shaped(*shape):  # a zero-stride view: the shapes matter, not the values
        return torch.zeros(()).expand(*shape)

    calls = []

    def product(x, y, precision):
        calls.append(tuple(x.shape))
        return shaped(*x.shape[:-1], y.shape[-1])

    monkeypatch.setattr(gemm, "matmul", product)
    gemm.batch_reduced_matmul(shaped(1 << 20, 50_257), shaped(1 << 20, 256), "bf16", MIN_ROWS)
    gemm.batch_reduced_matmul(shaped(6, 1 << 20, 512), shaped(6, 1 << 20, 512), "bf16", MIN_ROWS)
    assert calls == [(50_257, 1 << 20), (6 * 8, 512, (1 << 20) // 8)]  # 6 x 8 x 512 x 512 = 2**24 partials
