"""torch.func transforms (vmap, grad and their composition) run the model with its checks on (validate=True):
the range checks, which read values back to the host, are skipped while a transform runs, as under
torch.compile's tracing. Results are compared with the reference run without a transform."""

import pytest
import torch
from torch.func import functional_call, grad, vmap

from aunn_fast import AUNNConfig, backends
from aunn_fast.validation import transforming

from helpers import random_indices, random_model, rel_err

CFG = AUNNConfig(vocab_size=5, hidden=16, layers=4, bits=64)
FP32_TOLERANCE = 1e-5  # the same fp32 math, batched differently


def _model(generator, backend="reference"):
    model = random_model(CFG, generator, backend=backend, precision="fp32")
    assert model.validate
    return model


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# cpp and cuda are left out: their ops have no batching rule (vmap of their loss fails); "auto" runs the reference
# under vmap
@pytest.mark.parametrize(
    "device,backend",
    [
        (device, name)
        for device in DEVICES
        for name, reason in {**backends.available_backends(device), "auto": None}.items()
        if reason is None and name not in ("compile", "cpp", "cuda")
    ],
)
def test_vmap_forward_and_loss_match_the_reference(generator, device, backend):
    model = _model(generator, backend).to(device)
    oracle = random_model(CFG, torch.Generator(), backend="reference", precision="fp32").to(device)
    oracle.load_state_dict(model.state_dict())
    idx = random_indices(12, 64, generator).reshape(3, 4).to(device)
    targets = torch.randint(0, CFG.vocab_size, idx.shape, generator=generator).to(device)
    logits = vmap(model)(idx)
    assert logits.shape == (3, 4, CFG.vocab_size)
    assert rel_err(logits, oracle(idx)) < FP32_TOLERANCE
    losses = vmap(model.loss)(idx, targets)  # each row's mean
    assert rel_err(losses, oracle.loss(idx, targets, reduction="none").mean(1)) < FP32_TOLERANCE
    assert torch.equal(vmap(model.predict)(idx), model.predict(idx))


@pytest.mark.parametrize("backend", ["reference", "auto"])  # auto: the reference while transforming
def test_grad_and_per_sample_grads_match_backward(generator, backend):
    model = _model(generator, backend)
    idx = random_indices(6, 64, generator)
    targets = torch.randint(0, CFG.vocab_size, idx.shape, generator=generator)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of(p, i, t):
        return functional_call(model, p, (i,)).log_softmax(-1).gather(-1, t.unsqueeze(-1)).neg().mean()

    grads = grad(loss_of)(params, idx, targets)
    model.zero_grad()
    model.loss(idx, targets).backward()
    for name, p in model.named_parameters():
        assert rel_err(grads[name], p.grad) < FP32_TOLERANCE, name

    per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))(params, idx.unsqueeze(1), targets.unsqueeze(1))
    for row in (0, len(idx) - 1):
        model.zero_grad()
        model.loss(idx[row : row + 1], targets[row : row + 1]).backward()
        for name, p in model.named_parameters():
            assert rel_err(per_sample[name][row], p.grad) < FP32_TOLERANCE, (name, row)


def test_checks_hold_outside_a_transform_and_types_inside(generator):
    model = _model(generator)
    assert not transforming()
    with pytest.raises(ValueError, match="non-negative"):
        model(torch.tensor([-1]))
    with pytest.raises(TypeError, match="int64"):
        vmap(model)(torch.zeros(2, 3))
    seen = []
    vmap(lambda i: seen.append(transforming()) or model(i))(torch.zeros(2, 3, dtype=torch.int64))
    assert seen == [True]
