"""The fit metrics of ``aunn eval``: the same figures however the scoring is chunked."""
import math

import pytest
import torch
import torch.nn.functional as F

import aunn_fast.evaluate as evaluate
from aunn_fast import AUNNConfig
from aunn_fast.data import ToyData

from helpers import random_model


@pytest.mark.parametrize("logits_max", [evaluate.EVAL_LOGITS_MAX, 4 * 7, 3])
def test_fit_scores_every_index_in_chunks(generator, monkeypatch, logits_max):
    data = ToyData(chunks=25)
    model = random_model(AUNNConfig(vocab_size=4, hidden=16, layers=4, bits=16), generator)
    idx = torch.arange(data.length)
    logits, targets = model(idx), data.targets(idx)
    monkeypatch.setattr(evaluate, "EVAL_LOGITS_MAX", logits_max)
    metrics = evaluate.fit(model, data, torch.Generator())
    assert metrics["scored_indices"] == data.length
    assert metrics["train_accuracy"] == pytest.approx((logits.argmax(-1) == targets).double().mean().item())
    loss = F.cross_entropy(logits.double(), targets).item()
    assert metrics["train_loss"] == pytest.approx(loss, rel=1e-6)
    assert metrics["bits_per_token"] == pytest.approx(loss / math.log(2), rel=1e-6)
