"""The digits experiment: data layout, held-out split, generated and inpainted arrays, classifier metrics."""

import json
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from aunn_fast import AUNN, AUNNConfig, digits
from aunn_fast.cli import PRESETS, main
from aunn_fast.data import (
    DIGIT_ORDERS,
    DIGITS_HELD_OUT,
    DigitsData,
    data_from_description,
    load_data,
    similarity_tree_order,
)
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
    described = {"kind": "digits", "held_out": 97, "order": "scikit", "length": data.length}
    assert load_data("digits").describe() == load_data("digits:scikit").describe() == data.describe() == described
    reopened = data_from_description(data.describe(), data.vocab)
    assert isinstance(reopened, DigitsData) and reopened.length == data.length
    for spec in ("digits:5", "digits:labels", "digits:tree:1"):
        with pytest.raises(ValueError, match=r"digits\[:ORDER\]"):
            load_data(spec)
    with pytest.raises(ValueError, match="changed"):
        data_from_description({**data.describe(), "length": 64})
    older = {"kind": "digits", "held_out": 97, "length": data.length}  # a checkpoint from before the orders
    assert data_from_description(older).order == "scikit"
    with pytest.raises(ValueError, match="unknown digits order"):
        data_from_description({**data.describe(), "order": "shuffled"})


@pytest.mark.parametrize("order", DIGIT_ORDERS)
def test_every_order_places_the_same_training_digits(data, order):
    placed = load_data(f"digits:{order}")
    assert placed.describe() == {**data.describe(), "order": order}
    assert data_from_description(placed.describe()).train_images.tobytes() == placed.train_images.tobytes()
    pairs = sorted(zip(placed.train_images.reshape(data.images, -1).tolist(), placed.train_labels.tolist()))
    assert pairs == sorted(zip(data.train_images.reshape(data.images, -1).tolist(), data.train_labels.tolist()))
    every = placed.targets(torch.arange(placed.length)).numpy()
    assert np.array_equal(every, placed.train_images.reshape(-1))
    assert np.array_equal(placed.held_out_images, data.held_out_images)  # held out, and at their slots, alike


def test_label_order_keeps_scikit_learns_order_within_a_label(data):
    placed = DigitsData(order="label")
    assert np.all(np.diff(placed.train_labels) >= 0)
    for label in range(10):
        assert np.array_equal(
            placed.train_images[placed.train_labels == label], data.train_images[data.train_labels == label]
        )


def test_similarity_tree_splits_every_node_along_its_widest_direction():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(13, 3)) * [5.0, 2.0, 0.5]  # 13 images fill slots 0..12 of a 16-slot tree
    order = similarity_tree_order(points)
    assert sorted(order.tolist()) == list(range(13))

    def splits(first, slots):
        """(left, right) members of every node that has both children, slots [first, first + slots)."""
        half = slots // 2
        if slots == 1 or first + half >= len(order):
            return [] if slots == 1 else splits(first, half)
        left, right = order[first : first + half], order[first + half : first + slots]
        return [(left, right), *splits(first, half), *splits(first + half, half)]

    nodes = splits(0, 16)
    assert [len(left) + len(right) for left, right in nodes] == [13, 8, 4, 2, 2, 4, 2, 2, 5, 4, 2, 2]
    for left, right in nodes:
        members = points[np.concatenate([left, right])]
        centre = members.mean(0)
        direction = np.linalg.svd(members - centre, full_matrices=False)[2][0]
        direction *= np.sign(direction[np.argmax(np.abs(direction))])  # the left child is the low side of this
        low, high = (points[left] - centre) @ direction, (points[right] - centre) @ direction
        assert low.max() <= high.min()


def test_similarity_tree_puts_alike_digits_side_by_side(data):
    def neighbour_distance(images):
        flat = images.reshape(len(images), -1).astype(np.float64)
        return np.abs(np.diff(flat, axis=0)).sum(1).mean()

    tree = DigitsData(order="tree")
    assert neighbour_distance(tree.train_images) < 0.6 * neighbour_distance(data.train_images)
    assert np.mean(tree.train_labels[1:] == tree.train_labels[:-1]) > 0.8


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


def test_digits_demo_trains_the_tree_order_on_17_bits_with_focus(monkeypatch, tmp_path):
    """The preset's data, index bits and focus reach the run (its model and length shrunk to a smoke test)."""
    preset = PRESETS["digits"]
    assert (preset.data, preset.bits, preset.train.focus, preset.train.target_accuracy) == ("digits:tree", 17, 0.25, 1)
    small = replace(preset, hidden=16, layers=3, condition_steps=1, train=replace(preset.train, steps=4, eval_every=2))
    monkeypatch.setitem(PRESETS, "digits", small)
    assert main(["demo", "--preset", "digits", "--out", str(tmp_path), "--quiet", "--device", "cpu"]) == 0
    model = AUNN.load(tmp_path / "model.safetensors")
    assert model.cfg.bits == 17 and 1797 * 64 - 1 <= model.cfg.max_index  # every held-out slot fits
    assert model.data_description == {"kind": "digits", "held_out": 97, "order": "tree", "length": 108800}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["digits"]["inpainted"] == 97 and 0 <= metrics["train_accuracy"] <= 1
    other = tmp_path / "other"
    assert main(["demo", "--preset", "digits", "--data", "digits", "--out", str(other), "--quiet"]) == 0
    assert AUNN.load(other / "model.safetensors").cfg.bits == 64  # the preset's bits are for its own data
