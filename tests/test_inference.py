"""Prompting: generation, conditioning by backprop and Gwern's generate-by-backprop, against hand-written
versions of what each promises (a copy trained on exactly the prompt's indices; the original untouched)."""

import copy

import pytest
import torch

from aunn_fast import AUNNConfig
from aunn_fast.inference import condition, generate, generate_by_backprop

from helpers import random_model

CFG = AUNNConfig(vocab_size=5, hidden=16, layers=4, bits=40)


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _untouched(model, before):
    return all(torch.equal(p, b) and p.grad is None for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_condition_trains_a_copy_on_the_prompts_indices(generator, optimizer):
    """Bit for bit as torch.optim on the reference backend (the cpp backend's one-call step: test_cpp.py)."""
    model = random_model(CFG, generator, backend="reference")
    before = _snapshot(model)
    prompt = torch.randint(0, 5, (6,), generator=generator)
    at = int(torch.randint(0, 2**39, (1,), generator=generator))
    tuned = condition(model, prompt, at, steps=3, lr=1e-2, optimizer=optimizer)
    assert _untouched(model, before)
    by_hand = copy.deepcopy(model)
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(by_hand.parameters(), lr=1e-2)
    idx = torch.arange(at, at + 6)
    for _ in range(3):  # each step's gradient alone: zeroed in between
        opt.zero_grad()
        by_hand.loss(idx, prompt).backward()
        opt.step()
    for a, b in zip(tuned.parameters(), by_hand.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(tuned.parameters(), before))


def test_generate_by_backprop_trains_a_copy_on_each_prediction(generator):
    model = random_model(CFG, generator)
    before = _snapshot(model)
    start = int(torch.randint(0, 2**39, (1,), generator=generator))
    out = generate_by_backprop(model, start, 4, steps=2, lr=5e-2)
    assert _untouched(model, before)
    by_hand = copy.deepcopy(model)
    opt = torch.optim.Adam(by_hand.parameters(), lr=5e-2)
    expected = []
    for i in range(start, start + 4):
        idx = torch.tensor([i])
        token = by_hand.predict(idx)
        expected.append(int(token))
        for _ in range(2):
            opt.zero_grad()
            by_hand.loss(idx, token).backward()
            opt.step()
    assert out.tolist() == expected and out[0] == generate(model, start, 1)[0]


@pytest.mark.parametrize(
    "bits, fn, start, expected",
    [
        (64, generate, 2**63 - 2, "largest index"),
        (64, generate_by_backprop, 2**63 - 2, "largest index"),
        (40, generate_by_backprop, 2**40 - 2, "largest index"),
    ],
)
def test_spans_past_the_range_fail_before_any_work(generator, bits, fn, start, expected):
    """Three indices from start would pass the last one: an error naming the range (generate_by_backprop
    had trained on two positions and then failed on an int64 overflow)."""
    model = random_model(AUNNConfig(vocab_size=5, hidden=16, layers=4, bits=bits), generator)
    with pytest.raises(ValueError, match=expected):
        fn(model, start, 3)
