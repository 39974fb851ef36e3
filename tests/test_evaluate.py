"""The fit metrics of ``aunn eval``: the same figures however the scoring is chunked."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import aunn_fast.evaluate as evaluate
from aunn_fast import AUNN, AUNNConfig
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
    """All four toy tokens occur in the data, named most frequent first: named 2 keeps the two most frequent and
    sums the others."""
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
        assert list(hist) == [ToyData.vocab[i] for i in by_frequency]  # most frequent first
    else:
        top, rest = by_frequency[:named], by_frequency[named:]
        assert list(hist) == [ToyData.vocab[i] for i in top]  # most frequent first
        assert other == pytest.approx(
            {"tokens": len(rest), "training": float(training[rest].sum()), "predicted": float(predicted[rest].sum())}
        )
    for i, name in enumerate(ToyData.vocab):
        if name in hist:
            assert hist[name] == pytest.approx({"training": float(training[i]), "predicted": float(predicted[i])})


@pytest.mark.filterwarnings("error")  # e.g. matplotlib's, for an index axis that floats cannot resolve
@pytest.mark.parametrize("bits, chunks", [(12, 1000), (64, 2**61)])
def test_data_that_fills_the_index_range_is_evaluated_as_far_as_indices_go(
    generator, monkeypatch, tmp_path, bits, chunks
):
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
        {"conditioning.png"} if room else set()
    )
    assert f"({room:,} predictions after the data)" in (tmp_path / "report.md").read_text()


def test_fit_scores_every_index_up_to_the_sample_limit(monkeypatch, generator):
    data = ToyData(chunks=25)
    model = random_model(AUNNConfig(vocab_size=4, hidden=16, layers=3, bits=16), generator)
    monkeypatch.setattr(evaluate, "FIT_SAMPLE_LIMIT", data.length)
    idx = torch.arange(data.length)
    expected = F.cross_entropy(model(idx).double(), data.targets(idx)).item()
    scored = evaluate.fit(model, data, torch.Generator().manual_seed(0))
    assert scored["train_loss"] == pytest.approx(expected, rel=1e-6)


def test_extrapolation_window_ending_at_the_largest_index_is_kept():
    assert evaluate.extrapolation_windows(96, 1095)["near"] == (96, 1000)  # indices 96 .. 1095
    assert "near" not in evaluate.extrapolation_windows(96, 1094)


def test_valid_chunks_and_the_chance_level(generator):
    assert evaluate.valid_chunk_fraction(torch.tensor([0, 1, 1, 1, 0, 0, 0, 0, 0, 2, 2, 3])) == pytest.approx(1 / 3)
    model = random_model(AUNNConfig(vocab_size=4, hidden=8, layers=3, bits=16), generator)
    assert evaluate.extrapolation(model, ToyData(chunks=10))["chance_uniform"] == pytest.approx(3 / 4**4)


def _stub_condition(monkeypatch, data, taught):
    """Replace evaluate.condition: record the taught letter; the 'tuned' copy predicts the training data
    perfectly (so its accuracy, the drift figure, is exactly 1)."""

    def condition(model, prompt, at, **kwargs):
        taught.append(int(prompt[1]))
        tuned = copy.deepcopy(model)
        tuned.predict = lambda idx: data.targets(idx)
        return tuned

    monkeypatch.setattr(evaluate, "condition", condition)


def test_conditioning_teaches_a_new_letter_at_aligned_chunks_and_measures_the_tuned_copy(monkeypatch):
    data = ToyData(chunks=30)
    model = AUNN(AUNNConfig(vocab_size=4, hidden=16, layers=3, bits=16), seed=0)
    model.predict = lambda idx: torch.where(idx % 4 == 0, 0, 2)  # `|bbb` everywhere: `b` is never taught
    taught = []
    _stub_condition(monkeypatch, data, taught)
    result = evaluate.conditioning(
        model, data, trials=30, steps=1, lr=1e-3, optimizer="adam", generator=torch.Generator().manual_seed(0)
    )
    assert len(taught) == 30 and set(taught) <= {1, 3}
    assert all(e["index"] % 4 == 0 and e["index"] >= data.length for e in result["examples"])
    assert result["train_accuracy_after"] == 1.0


def test_conditioning_runs_when_exactly_one_chunk_follows_the_data(monkeypatch):
    data = ToyData(chunks=1023)  # 4092 indices: 4 left in bits=12
    model = AUNN(AUNNConfig(vocab_size=4, hidden=8, layers=3, bits=12), seed=0)
    model.vocab = ToyData.vocab
    _stub_condition(monkeypatch, data, [])
    metrics = evaluate.evaluate(model, data, condition_trials=1)
    assert metrics["conditioning"]["examples"][0]["index"] == 4092


def test_byte_token_names():
    model = AUNN(AUNNConfig(vocab_size=256, hidden=8, layers=2, bits=8))
    names = evaluate._token_names(model)
    assert (names[65], names[127], names[128], names[255]) == ("A", "\x7f", "0x80", "0xff")
