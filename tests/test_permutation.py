"""The epoch permutation is a bijection of [0, n) for every n up to 2^63, and the sampler walks it exactly."""

import pytest
import torch

import aunn_fast.sampler as sampler_module
from aunn_fast.permutation import IndexPermutation
from aunn_fast.sampler import EpochSampler

SMALL_LENGTHS = sorted({*range(1, 70), *(2**k + d for k in range(1, 13) for d in (-1, 0, 1)), 1000, 4099})


@pytest.mark.parametrize("seed, epoch", [(0, 0), (7, 3), (2**63 - 1, 12345)])
def test_a_bijection_exhaustively_for_small_lengths(seed, epoch):
    for n in SMALL_LENGTHS:
        perm = IndexPermutation(n, seed, epoch)
        positions = torch.arange(n)
        indices = perm(positions)
        assert indices.dtype == torch.int64
        assert torch.equal(indices.sort().values, positions), n
        assert torch.equal(perm.position(indices), positions), n


@pytest.mark.parametrize("n", [2**40, 2**63 - 1, 2**63])
def test_no_collisions_among_millions_of_draws_for_huge_lengths(n):
    """2M draws: a random function of [0, 2^40) would collide about twice (birthday bound m^2 / 2n), a
    bijection never; beyond that, every draw is mapped back to its position by the inverse, which no
    non-injective map has. The draws are a contiguous run at the top of the range (where a cycle-walking
    bug would show), a run at 0 and random positions."""
    generator = torch.Generator().manual_seed(0)
    top = n - 2**20 + torch.arange(2**20)
    positions = torch.cat(
        [top, torch.arange(2**19), torch.randint(0, n if n < 2**63 else 2**63 - 1, (2**19,), generator=generator)]
    ).unique()
    perm = IndexPermutation(n, seed=3, epoch=1)
    indices = perm(positions)
    assert indices.min() >= 0 and (indices.max() <= n - 1 if n < 2**63 else True)
    assert indices.unique().numel() == positions.numel()
    assert torch.equal(perm.position(indices), positions)
    first = indices[2**20 : 2**20 + 4096].double() / n  # a run of positions lands spread over the whole range
    assert 0.45 < first.mean() < 0.55 and first.min() < 0.01 and first.max() > 0.99


def test_every_epoch_and_seed_has_its_own_order():
    n, positions = 1000, torch.arange(1000)
    orders = [IndexPermutation(n, seed, epoch)(positions) for seed in (0, 1) for epoch in (0, 1, 2)]
    for i, a in enumerate(orders):
        assert (a == positions).float().mean() < 0.02  # about 1/n of the positions are fixed points
        for b in orders[i + 1 :]:
            assert (a == b).float().mean() < 0.02
    assert torch.equal(IndexPermutation(n, 1, 2)(positions), orders[-1])  # and each one is reproducible


def test_bad_arguments_are_refused():
    for length in (0, 2**63 + 1):
        with pytest.raises(ValueError, match="length"):
            IndexPermutation(length, 0, 0)
    with pytest.raises(ValueError, match="seed and epoch"):
        IndexPermutation(10, -1, 0)
    with pytest.raises(TypeError, match="int64"):
        IndexPermutation(10, 0, 0)(torch.arange(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(10, 4, 0, "cpu", rank=2, world_size=2)


def test_an_epoch_covers_the_data_once_then_reshuffles():
    sampler = EpochSampler(length=100, batch_size=32, seed=1, device="cpu")
    batches = [sampler.indices(step) for step in range(4)]
    assert [b.numel() for b in batches] == [32, 32, 32, 4]  # the last batch of an epoch is shorter
    assert sorted(torch.cat(batches).tolist()) == list(range(100))
    assert not torch.equal(sampler.indices(4), batches[0])
    assert torch.equal(EpochSampler(100, 32, 1, "cpu").indices(2), batches[2])  # a function of (seed, step)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_ranks_split_the_same_global_batch(world_size):
    """Whatever the number of ranks, their shares put together are the 1-process batch, in order; a global
    batch smaller than the number of ranks leaves some ranks an empty share."""
    one = EpochSampler(length=103, batch_size=25, seed=4, device="cpu")
    ranks = [EpochSampler(103, 25, 4, "cpu", rank=r, world_size=world_size) for r in range(world_size)]
    for step in range(10):  # two epochs of 5 steps, the last of each 3 indices long
        shares = [s.indices(step) for s in ranks]
        assert torch.equal(torch.cat(shares), one.indices(step))
        assert max(s.numel() for s in shares) - min(s.numel() for s in shares) <= 1
        assert all(s.global_batch_size(step) == one.indices(step).numel() for s in ranks)


def test_a_materialised_epoch_equals_the_one_computed_per_batch(monkeypatch):
    materialised = [EpochSampler(1000, 64, 9, "cpu").indices(step) for step in range(20)]
    monkeypatch.setattr(sampler_module, "MATERIALISE_LIMIT", 999)
    computed = [EpochSampler(1000, 64, 9, "cpu").indices(step) for step in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(materialised, computed))


def test_huge_data_is_walked_in_exact_epochs():
    """2^63 indices (every int64 >= 0): a step's batch is distinct indices spread over the range."""
    sampler = EpochSampler(length=2**63, batch_size=4096, seed=1, device="cpu", rank=1, world_size=2)
    idx = sampler.indices(2**55)
    assert idx.shape == (2048,) and idx.min() >= 0 and idx.unique().numel() == 2048
    assert 0.4 < (idx.double() / 2**63).mean() < 0.6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_permutation_is_the_same_on_cuda():
    positions = torch.arange(2**62, 2**62 + 10_000)
    perm = IndexPermutation(2**63 - 5, 2, 3)
    assert torch.equal(perm(positions.cuda()).cpu(), perm(positions))
