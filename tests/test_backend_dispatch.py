"""Every usable backend behind the AUNN module gives the reference's answers (fp32)."""
import pytest
import torch

from aunn_fast import AUNNConfig
from aunn_fast.backends import available_backends

from helpers import random_indices, random_model, rel_err

USABLE = [name for name, reason in available_backends("cpu").items() if reason is None and name != "reference"]


@pytest.mark.parametrize("backend", USABLE)
def test_backend_matches_reference_through_the_module(generator, backend):
    cfg = AUNNConfig(vocab_size=7, hidden=32, layers=5, bits=64)
    ref = random_model(cfg, generator, backend="reference", precision="fp32")
    fast = random_model(cfg, generator, backend=backend, precision="fp32")
    fast.load_state_dict(ref.state_dict())
    idx = random_indices(30, 64, generator).reshape(5, 6)
    targets = torch.randint(0, 7, (5, 6), generator=generator)
    assert rel_err(fast(idx), ref(idx)) < 1e-5
    assert fast.predict(idx).shape == (5, 6)
    ref.loss(idx, targets).backward()
    fast_loss = fast.loss(idx, targets)
    fast_loss.backward()
    assert rel_err(fast_loss, ref.loss(idx, targets)) < 1e-5
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        assert rel_err(a.grad, b.grad) < 1e-4, name
