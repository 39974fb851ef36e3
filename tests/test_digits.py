"""The digits experiment: data layout, held-out split, generated and inpainted arrays, classifier metrics."""

import sys

import numpy as np
import pytest
import torch

from aunn_fast import AUNN, AUNNConfig, digits
from aunn_fast.cli import main
from aunn_fast.data import DIGITS_HELD_OUT, DigitsData, data_from_description, load_data
from aunn_fast.train import TrainConfig, train

sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn is absent: pip install -e '.[digits]'")


@pytest.fixture(scope="module")
def data() -> DigitsData:
    return DigitsData()


def test_digits_are_laid_end_to_end_row_major(data):
    bunch = sklearn_datasets.load_digits()
    kept = len(bunch.images) - DIGITS_HELD_OUT
    assert (data.images, data.held_out, data.length) == (kept, 97, kept * 64)
    assert data.vocab_size == 17 and data.vocab == list("0123456789abcdefg")
    image, row, column = 1234, 5, 2
    index = torch.tensor([image * 64 + row * 8 + column, 0, data.length - 1])
    expected = [bunch.images[image, row, column], bunch.images[0, 0, 0], bunch.images[kept - 1, 7, 7]]
    assert data.targets(index).tolist() == [int(v) for v in expected]
    every = data.targets(torch.arange(data.length)).numpy()
    assert np.array_equal(every, bunch.images[:kept].reshape(-1).astype(np.int64))
    assert every.min() == 0 and every.max() == 16


def test_the_last_97_digits_are_held_out(data):
    bunch = sklearn_datasets.load_digits()
    assert np.array_equal(data.held_out_images, bunch.images[-97:])
    assert np.array_equal(data.held_out_labels, bunch.target[-97:])
    assert np.array_equal(data.train_labels, bunch.target[:-97])
    assert data.image_start(data.images) == data.length  # the first held-out digit's slot follows the data


def test_digits_spec_and_description_reopen(data):
    assert (
        load_data("digits").describe() == data.describe() == {"kind": "digits", "held_out": 97, "length": data.length}
    )
    reopened = data_from_description(data.describe(), data.vocab)
    assert isinstance(reopened, DigitsData) and reopened.length == data.length
    with pytest.raises(ValueError, match="takes no argument"):
        load_data("digits:5")
    with pytest.raises(ValueError, match="changed"):
        data_from_description({**data.describe(), "length": 64})


def test_digits_without_scikit_learn_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails, as when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'aunn_fast\[digits\]'"):
        DigitsData()


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    """A tiny, briefly trained model's digits experiment: (metrics, output directory)."""
    model = AUNN(AUNNConfig(vocab_size=17, hidden=16, layers=3), backend="reference", seed=0)
    out = tmp_path_factory.mktemp("digits")
    train(model, data, TrainConfig(batch_size=512, steps=4, lr=1e-2, warmup_steps=1, log_every=2), out, progress=False)
    return digits.run(model, data, out, steps=1, lr=1e-3), out


def test_saved_arrays_have_their_shapes_and_ranges(run, data):
    metrics, out = run
    generated, inpainted = np.load(out / "generated.npy"), np.load(out / "inpainted.npy")
    truth, labels = np.load(out / "inpaint_truth.npy"), np.load(out / "inpaint_labels.npy")
    assert generated.shape == (64, 8, 8) and inpainted.shape == truth.shape == (97, 8, 8) and labels.shape == (97,)
    for array in (generated, inpainted, truth, labels):
        assert array.dtype.kind == "i"
    for array in (generated, inpainted, truth):
        assert array.min() >= 0 and array.max() <= 16
    assert np.array_equal(truth, data.held_out_images) and np.array_equal(labels, data.held_out_labels)
    assert np.array_equal(inpainted[:, :4], truth[:, :4])  # the taught top half is the real one
    assert (out / "digits_generated.png").stat().st_size > 0 and (out / "digits_inpainted.png").stat().st_size > 0


def test_digit_metrics_are_the_classifiers_verdicts(run, data):
    from sklearn.linear_model import LogisticRegression

    metrics, out = run
    generated, inpainted = np.load(out / "generated.npy"), np.load(out / "inpainted.npy")
    truth, labels = np.load(out / "inpaint_truth.npy"), np.load(out / "inpaint_labels.npy")
    classifier = LogisticRegression(max_iter=2000, random_state=0).fit(
        data.train_images.reshape(-1, 64) / 16, data.train_labels
    )

    def accuracy(images):
        return (classifier.predict(images.reshape(-1, 64) / 16) == labels).mean()

    blank = truth.copy()
    blank[:, 4:] = 0
    confident = (classifier.predict_proba(generated.reshape(-1, 64) / 16).max(1) >= 0.9).mean()
    assert metrics["confident_share"] == pytest.approx(confident)
    real = (classifier.predict_proba(truth.reshape(-1, 64) / 16).max(1) >= 0.9).mean()
    assert metrics["truth_confident_share"] == pytest.approx(real)
    assert metrics["inpainted_accuracy"] == pytest.approx(accuracy(inpainted))
    assert metrics["blank_bottom_accuracy"] == pytest.approx(accuracy(blank))
    assert metrics["truth_accuracy"] == pytest.approx(accuracy(truth)) and metrics["truth_accuracy"] > 0.9
    assert metrics["bottom_pixel_accuracy"] == pytest.approx((inpainted[:, 4:] == truth[:, 4:]).mean())
    assert sum(metrics["generated_classes"]) == 64


def test_digit_metrics_of_known_images(data):
    classifier = digits.train_classifier(data)
    truth, labels = data.held_out_images.astype(np.int64), data.held_out_labels
    perfect = digits.digit_metrics(classifier, data.train_images[:64].astype(np.int64), truth, truth, labels)
    assert perfect["inpainted_accuracy"] == perfect["truth_accuracy"] > perfect["blank_bottom_accuracy"]
    assert perfect["bottom_pixel_accuracy"] == 1.0 and perfect["confident_share"] > 0.5
    blank = digits.digit_metrics(classifier, np.zeros((64, 8, 8), np.int64), digits.blank_bottom(truth), truth, labels)
    assert blank["inpainted_accuracy"] == blank["blank_bottom_accuracy"]
    assert blank["bottom_pixel_accuracy"] == blank["blank_bottom_pixel_accuracy"] < 1


def test_digits_without_scikit_learn_fail_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["train", "--data", "digits", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        "aunn train: error: the digits data needs scikit-learn: pip install 'aunn_fast[digits]'"
    )
    assert not (tmp_path / "run").exists()
