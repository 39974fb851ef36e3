"""The reference path against an independent, straightforward implementation of the seed model."""

import pytest
import torch
from torch import nn

from aunn_fast import AUNN, AUNNConfig, reference

from helpers import random_indices, random_model, rel_err


class SeedAUNN(nn.Module):
    """The seed notebook's model, written plainly: nn.Linear, nn.SiLU, nn.RMSNorm per layer."""

    def __init__(self, bits: int, hidden: int, layers: int, vocab: int, residual_every: int = 2):
        super().__init__()
        self.bits, self.residual_every = bits, residual_every
        eps = torch.finfo(torch.float32).eps  # what RMSNorm(eps=None) uses on the seed's float32 tensors
        self.input_layer = nn.Sequential(nn.Linear(bits, hidden), nn.SiLU(), nn.RMSNorm(hidden, eps=eps))
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.RMSNorm(hidden, eps=eps)) for _ in range(layers - 2)
        )
        self.output_layer = nn.Linear(hidden, vocab)

    def forward(self, idx: list[int]) -> torch.Tensor:
        dtype = self.output_layer.weight.dtype
        x = torch.tensor([[(i >> j) & 1 for j in range(self.bits)] for i in idx], dtype=dtype)
        x = self.input_layer(x)
        residual = x
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if (i + 1) % self.residual_every == 0:
                x = x + residual
                residual = x
        return self.output_layer(x)


@pytest.mark.parametrize(
    "bits,hidden,layers,vocab,residual_every",
    [
        (64, 64, 8, 4, 2),
        (64, 32, 2, 5, 2),
        (17, 16, 5, 3, 1),
        (40, 48, 7, 7, 3),
        (1, 16, 3, 2, 2),
    ],
)
def test_reference_matches_seed_model(generator, bits, hidden, layers, vocab, residual_every):
    cfg = AUNNConfig(vocab_size=vocab, hidden=hidden, layers=layers, bits=bits, residual_every=residual_every)
    model = random_model(cfg, generator, backend="reference", precision="fp32")
    seed = SeedAUNN(bits, hidden, layers, vocab, residual_every)
    seed.load_state_dict(model.to_seed_state_dict())
    idx = random_indices(37, bits, generator)
    expected = seed.double()(idx.tolist())
    actual = model(idx)
    assert actual.dtype == torch.float32 and actual.shape == (37, vocab)
    assert rel_err(actual, expected) < 1e-5
    targets = torch.randint(0, vocab, (37,), generator=generator)
    expected_loss = nn.functional.cross_entropy(expected, targets)
    assert abs(model.loss(idx, targets).item() - expected_loss.item()) < 1e-5 * max(1.0, expected_loss.item())


def test_reference_gradients_match_seed_model(generator):
    cfg = AUNNConfig(vocab_size=6, hidden=32, layers=6)
    model = random_model(cfg, generator, backend="reference", precision="fp32").double()
    seed = SeedAUNN(64, 32, 6, 6).double()
    seed.load_state_dict(model.to_seed_state_dict())
    idx = random_indices(50, 64, generator)
    targets = torch.randint(0, 6, (50,), generator=generator)
    model.loss(idx, targets).backward()
    nn.functional.cross_entropy(seed(idx.tolist()), targets).backward()
    ours = AUNN.from_seed_state_dict({k: v for k, v in seed.state_dict().items()})  # structure only
    assert ours.cfg == cfg
    assert rel_err(model.in_weight.grad, seed.input_layer[0].weight.grad) < 1e-10
    assert rel_err(model.in_bias.grad, seed.input_layer[0].bias.grad) < 1e-10
    assert rel_err(model.in_gain.grad, seed.input_layer[2].weight.grad) < 1e-10
    for i in range(cfg.hidden_layers):
        assert rel_err(model.hidden_weight.grad[i], seed.layers[i][0].weight.grad) < 1e-10
        assert rel_err(model.hidden_bias.grad[i], seed.layers[i][0].bias.grad) < 1e-10
        assert rel_err(model.hidden_gain.grad[i], seed.layers[i][2].weight.grad) < 1e-10
    assert rel_err(model.out_weight.grad, seed.output_layer.weight.grad) < 1e-10
    assert rel_err(model.out_bias.grad, seed.output_layer.bias.grad) < 1e-10


def test_embedding_keeps_every_bit_of_large_indices():
    idx = torch.tensor([2**63 - 1, 2**62 + 1, 2**24 + 1, 0], dtype=torch.int64)
    bits = reference.binary_embedding(idx, 64)
    for row, i in zip(bits.tolist(), idx.tolist()):
        assert sum(int(b) << j for j, b in enumerate(row)) == i


# The precisions' budgets through 8 layers (worst seen over 30 draws: bf16 7.0e-3, tf32 8.6e-4).
@pytest.mark.parametrize("precision,bound", [("bf16", 1e-2), ("tf32", 1.5e-3)])
def test_reduced_precision_reference_error_is_bounded(generator, precision, bound):
    cfg = AUNNConfig(vocab_size=8, hidden=64, layers=8)
    model = random_model(cfg, generator)
    idx = random_indices(256, 64, generator)
    exact = reference.logits(idx, AUNNParamsDouble(model), cfg)
    err = rel_err(reference.logits(idx, model.params, cfg, precision), exact)
    assert 1e-5 < err < bound  # rounding happened, and stayed within the precision's budget


def AUNNParamsDouble(model: AUNN):
    return type(model.params)(*(p.detach().double() for p in model.params))


def test_bf16_reference_rounds_operands_like_torch_bf16_matmul(generator):
    a = torch.randn(64, 64, generator=generator)
    w = torch.randn(32, 64, generator=generator)
    ours = reference._linear(a, w, None, "bf16")
    torch_bf16 = a.bfloat16().float() @ w.bfloat16().float().T
    assert torch.equal(ours, torch_bf16)


def test_bf16_rounding_of_exact_ties_is_to_even(generator):
    """round_to_bf16 on values exactly halfway between two bf16 numbers (which random data never
    hits) rounds as torch's cast does: to the even one."""
    bits = torch.randn(4096, generator=generator).view(torch.int32)
    ties = ((bits & ~0xFFFF) | 0x8000).view(torch.float32)
    assert torch.equal(reference.round_to_bf16(ties), ties.to(torch.bfloat16).float())
