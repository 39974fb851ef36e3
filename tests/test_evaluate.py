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



@pytest.mark.parametrize("named", [evaluate.HISTOGRAM_TOKENS, 2])
def test_histogram_names_the_most_frequent_tokens_and_sums_the_rest(generator, monkeypatch, named):
    """All four toy tokens occur in the data: named 2 keeps the two most frequent and sums the others."""
    data = ToyData(chunks=50)
    model = random_model(AUNNConfig(vocab_size=4, hidden=16, layers=4, bits=16), generator)
    model.vocab = ToyData.vocab
    monkeypatch.setattr(evaluate, "HISTOGRAM_SPAN", 400)
    monkeypatch.setattr(evaluate, "HISTOGRAM_TOKENS", named)
    sampler = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    replay = torch.Generator().set_state(sampler.get_state())
    predicted = torch.bincount(model.predict(torch.arange(data.length, data.length + 400)), minlength=4) / 400
    sample = torch.randint(0, data.length, (data.length,), generator=replay)
    training = torch.bincount(data.targets(sample), minlength=4) / data.length
    frequency = torch.maximum(predicted, training)
    by_frequency = sorted(range(4), key=lambda i: -float(frequency[i]))

    hist, other = evaluate.histogram(model, data, sampler)

    if named >= 4:
        assert other is None
        assert list(hist) == ToyData.vocab  # vocabulary order
    else:
        top, rest = by_frequency[:named], by_frequency[named:]
        assert list(hist) == [ToyData.vocab[i] for i in top]  # most frequent first
        assert other == pytest.approx({"tokens": len(rest), "training": float(training[rest].sum()),
                                       "predicted": float(predicted[rest].sum())})
    for i, name in enumerate(ToyData.vocab):
        if name in hist:
            assert hist[name] == pytest.approx({"training": float(training[i]), "predicted": float(predicted[i])})


@pytest.mark.filterwarnings("error")  # e.g. matplotlib's, for an index axis that floats cannot resolve
@pytest.mark.parametrize("bits, chunks", [(12, 1000), (64, 2**61)])
def test_data_that_fills_the_index_range_is_evaluated_as_far_as_indices_go(generator, monkeypatch, tmp_path, bits,
                                                                           chunks):
    """Toy data ending 96 indices before 2**12, and data filling all 2**63 int64 indices: every metric that
    needs indices after the data covers those there are, and the report and plots are written."""
    from aunn_fast.report import write_report

    monkeypatch.setattr(evaluate, "FIT_SAMPLE_LIMIT", 2048)
    data = ToyData(chunks=chunks)
    model = random_model(AUNNConfig(vocab_size=4, hidden=16, layers=4, bits=bits), generator)
    model.vocab = ToyData.vocab
    room = model.cfg.max_index + 1 - data.length
    assert room == (96 if bits == 12 else 0)

    metrics = evaluate.evaluate(model, data, condition_trials=3)

    assert metrics["histogram_predictions"] == room
    predicted = sum(h["predicted"] for h in metrics["histogram"].values())
    assert predicted == pytest.approx(1.0 if room else 0.0)
    assert metrics["extrapolation_windows"] == {} and set(metrics["extrapolation"]) == {"chance_uniform"}
    if room:
        assert metrics["conditioning"]["trials"] == 3
        assert all(data.length <= e["index"] <= model.cfg.max_index - 3 for e in metrics["conditioning"]["examples"])
    else:
        assert "conditioning" not in metrics
    written = {path.name for path in write_report(tmp_path, model, data, metrics, [])}
    assert written == {"metrics.json", "report.md", "end_of_data.png", "histogram.png", "extrapolation.png"} | (
        {"conditioning.png"} if room else set())
    assert f"({room:,} predictions after the data)" in (tmp_path / "report.md").read_text()
