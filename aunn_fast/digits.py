"""The handwritten-digits experiment: digits drawn past the end of the data, and held-out digits
inpainted by conditioning (teach the top half by backprop, read the bottom half back).

A classifier trained on the training digits (scikit-learn's logistic regression) judges both: the
share of generated digits it recognises with confidence, and its accuracy on the inpainted digits
against the same digits with the bottom half left blank (the baseline that inpainting must beat).

Images are int64 NumPy arrays [n, 8, 8] of grey levels 0..16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import DIGIT_LEVELS, DIGIT_PIXELS, DIGIT_SIDE, DigitsData
from .evaluate import predictions
from .inference import condition
from .model import AUNN
from .plots import _save, plt

GENERATED_IMAGES = 64
CONFIDENT = 0.9  # a generated digit counts as recognised when the classifier gives one class this probability
TAUGHT_ROWS = DIGIT_SIDE // 2  # rows taught when inpainting; the rest are read back
TAUGHT_PIXELS = TAUGHT_ROWS * DIGIT_SIDE


def generate_digits(model: AUNN, data: DigitsData, count: int = GENERATED_IMAGES) -> np.ndarray:
    """int64 [count, 8, 8]: the argmax images at the image slots right after the training data."""
    tokens = predictions(model, data.length, count * DIGIT_PIXELS)
    return tokens.numpy().reshape(count, DIGIT_SIDE, DIGIT_SIDE)


def inpaint(model: AUNN, data: DigitsData, steps: int, lr: float, optimizer: str = "adam") -> np.ndarray:
    """int64 [held_out, 8, 8]: each held-out digit's top TAUGHT_ROWS rows, taught to a fresh copy of the model
    by ``steps`` conditioning steps at that digit's own slot (held-out image k at image slot images + k, where
    the sequence would continue), with the bottom rows that copy then predicts there."""
    completed = np.empty((data.held_out, DIGIT_SIDE, DIGIT_SIDE), dtype=np.int64)
    for k, image in enumerate(data.held_out_images):
        at = data.image_start(data.images + k)
        top = torch.from_numpy(image.reshape(-1)[:TAUGHT_PIXELS].astype(np.int64))
        tuned = condition(model, top, at, steps=steps, lr=lr, optimizer=optimizer)
        bottom = predictions(tuned, at + TAUGHT_PIXELS, DIGIT_PIXELS - TAUGHT_PIXELS).numpy()
        completed[k] = np.concatenate([top.numpy(), bottom]).reshape(DIGIT_SIDE, DIGIT_SIDE)
    return completed


def blank_bottom(images: np.ndarray) -> np.ndarray:
    """The images with every row below the taught ones set to 0 (the baseline's input)."""
    blanked = images.copy()
    blanked[:, TAUGHT_ROWS:] = 0
    return blanked


def train_classifier(data: DigitsData, seed: int = 0) -> Any:
    """scikit-learn's logistic regression fitted to the training digits (pixels scaled to 0..1)."""
    from sklearn.linear_model import LogisticRegression  # data.DigitsData has already needed scikit-learn

    classifier = LogisticRegression(max_iter=2000, random_state=seed)
    classifier.fit(_features(data.train_images), data.train_labels)
    return classifier


def _features(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / (DIGIT_LEVELS - 1)


def digit_metrics(
    classifier: Any, generated: np.ndarray, inpainted: np.ndarray, truth: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """metrics.json's ``digits`` entry. ``confident_share``: generated digits given one class with probability
    >= CONFIDENT; ``inpainted_accuracy`` against ``blank_bottom_accuracy`` (same digits, bottom rows 0) and
    ``truth_accuracy`` (the real digits), ``truth_confident_share``: the real held-out digits recognised with
    confidence (what a perfect generator would score); ``bottom_pixel_accuracy``: predicted bottom pixels equal
    to the real ones, beside ``blank_bottom_pixel_accuracy`` (the real bottom pixels that are 0)."""

    def confident(images: np.ndarray) -> float:
        return float((classifier.predict_proba(_features(images)).max(axis=1) >= CONFIDENT).mean())

    def accuracy(images: np.ndarray) -> float:
        return float((classifier.predict(_features(images)) == labels).mean())

    classes = np.bincount(classifier.predict(_features(generated)), minlength=10)
    bottom, true_bottom = inpainted[:, TAUGHT_ROWS:], truth[:, TAUGHT_ROWS:]
    return {
        "generated": len(generated),
        "confident_share": confident(generated),
        "truth_confident_share": confident(truth),
        "confidence_threshold": CONFIDENT,
        "generated_classes": classes.tolist(),
        "inpainted": len(inpainted),
        "inpainted_accuracy": accuracy(inpainted),
        "blank_bottom_accuracy": accuracy(blank_bottom(truth)),
        "truth_accuracy": accuracy(truth),
        "bottom_pixel_accuracy": float((bottom == true_bottom).mean()),
        "blank_bottom_pixel_accuracy": float((true_bottom == 0).mean()),
    }


def run(model: AUNN, data: DigitsData, out_dir: Path, steps: int, lr: float, optimizer: str = "adam") -> dict[str, Any]:
    """Generate, inpaint and judge; write generated.npy, inpainted.npy, inpaint_truth.npy, inpaint_labels.npy,
    digits_generated.png and digits_inpainted.png into out_dir. Returns the ``digits`` metrics (with the
    conditioning settings)."""
    generated = generate_digits(model, data)
    inpainted = inpaint(model, data, steps, lr, optimizer)
    truth = data.held_out_images.astype(np.int64)
    labels = data.held_out_labels
    for name, array in (
        ("generated", generated),
        ("inpainted", inpainted),
        ("inpaint_truth", truth),
        ("inpaint_labels", labels),
    ):
        np.save(out_dir / f"{name}.npy", array)
    metrics = digit_metrics(train_classifier(data), generated, inpainted, truth, labels)
    metrics.update({"inpaint_steps": steps, "inpaint_lr": lr, "inpaint_optimizer": optimizer})
    plot_grid(
        generated,
        out_dir / "digits_generated.png",
        f"{len(generated)} digits generated after the data ({metrics['confident_share']:.0%} recognised "
        f"with p >= {CONFIDENT})",
    )
    plot_inpainting(truth, inpainted, labels, out_dir / "digits_inpainted.png")
    return metrics


def plot_grid(images: np.ndarray, path: Path, title: str, columns: int = 8) -> None:
    """Grey-level images [n, 8, 8] in a grid of ``columns``."""
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.9, rows * 0.9 + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, image in zip(axes.flat, images):
        _show(ax, image)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def plot_inpainting(
    truth: np.ndarray, inpainted: np.ndarray, labels: np.ndarray, path: Path, shown: int = 24, columns: int = 6
) -> None:
    """The first ``shown`` held-out digits, each as a pair: the real digit, then the taught top rows with the
    predicted bottom rows (a red line between them)."""
    shown = min(shown, len(truth))
    rows = -(-shown // columns)
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2 * columns * 0.8, rows * 0.95 + 0.6), squeeze=False)
    for k in range(rows * columns):
        real_ax, completed_ax = axes.flat[2 * k], axes.flat[2 * k + 1]
        for ax in (real_ax, completed_ax):
            ax.set_axis_off()
        if k >= shown:
            continue
        _show(real_ax, truth[k])
        real_ax.set_title(f"{labels[k]}", fontsize=7)
        _show(completed_ax, inpainted[k])
        completed_ax.axhline(TAUGHT_ROWS - 0.5, color="tab:red", linewidth=1)
        completed_ax.set_title("inpainted", fontsize=7)
    fig.suptitle(
        "Held-out digits (left) and their inpainting: top half taught, bottom half predicted (right)", fontsize=9
    )
    _save(fig, path)


def _show(ax: plt.Axes, image: np.ndarray) -> None:
    """One 8x8 image, dark ink on white, in a thin grey frame (so a blank image still shows)."""
    ax.set_axis_on()
    ax.imshow(image, cmap="gray_r", vmin=0, vmax=DIGIT_LEVELS - 1)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("0.8")
