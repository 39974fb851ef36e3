"""What ``aunn eval`` and ``aunn demo`` measure: fit, extrapolation and conditioning.

All figures are computed from the model and the dataset; ``metrics.json`` holds them,
``report.md`` and the PNG plots show them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .data import Dataset, HeldOutTail, ToyData, decode, uniform_indices
from .errors import UserInputError
from .inference import condition, span
from .model import AUNN

EVAL_BATCH = 65_536
EVAL_LOGITS_MAX = 1 << 24  # logits held at once when scoring (64 MB): fewer rows for a large vocabulary
FIT_SAMPLE_LIMIT = 1 << 22  # larger datasets are scored on a random sample of this many indices
HISTOGRAM_SPAN = 100_000  # indices after the data whose predictions are histogrammed
HISTOGRAM_TOKENS = 96  # tokens the histogram names; a larger vocabulary's rarer ones are summed as one entry
EXTRAPOLATION_WINDOW = 4_000
# "near": every index from the data's end to where the "1k" window begins (250 toy chunks); its first 25 chunks
# alone were measured before, and 1 to 3 invalid ones among them (0.04 each) decided pass or fail by chance
NEAR_WINDOW = 1_000
SUMMARY_TOKENS = 8  # tokens the summary's histogram line names, the most often predicted


def room_after(model: AUNN, data: Dataset) -> int:
    """How many indices follow the data within the model's index range (0 when the data fills it)."""
    return model.cfg.max_index + 1 - data.length


def histogram_span(model: AUNN, data: Dataset) -> int:
    """How many predictions after the data the histogram counts: HISTOGRAM_SPAN, or as many as there are."""
    return min(HISTOGRAM_SPAN, room_after(model, data))


def _batches(idx: torch.Tensor, vocab_size: int = 1) -> list[torch.Tensor]:
    """idx in chunks of EVAL_BATCH indices, fewer where their logits would exceed EVAL_LOGITS_MAX elements."""
    return list(idx.split(max(1, min(EVAL_BATCH, EVAL_LOGITS_MAX // vocab_size))))


@torch.no_grad()
def fit(model: AUNN, data: Dataset, generator: torch.Generator) -> dict[str, Any]:
    """Training accuracy, mean loss and bits per token over the data (or a sample of it)."""
    if data.length <= FIT_SAMPLE_LIMIT:
        idx = torch.arange(data.length, dtype=torch.int64)
    else:
        idx = uniform_indices(data.length, FIT_SAMPLE_LIMIT, generator)
    correct, total_loss = 0, 0.0
    for chunk in _batches(idx.to(model.device), model.cfg.vocab_size):
        targets = data.targets(chunk)
        logits = model(chunk)
        correct += int((logits.argmax(-1) == targets).sum())
        total_loss += float(F.cross_entropy(logits, targets, reduction="sum"))
    loss = total_loss / idx.numel()
    return {
        "train_accuracy": correct / idx.numel(),
        "train_loss": loss,
        "bits_per_token": loss / math.log(2),
        "scored_indices": idx.numel(),
    }


@torch.no_grad()
def predictions(model: AUNN, start: int, length: int) -> torch.Tensor:
    """int64 [length] argmax tokens at start .. start+length-1 (on the CPU)."""
    if length == 0:  # also at 2**63, one past the last int64, where the data fills the index range
        return torch.empty(0, dtype=torch.int64)
    idx = span(model, start, length)
    return torch.cat([model.predict(chunk) for chunk in _batches(idx)]).cpu()


@torch.no_grad()
def held_out_fit(model: AUNN, data: HeldOutTail) -> dict[str, Any]:
    """Bits per token and accuracy of the model's predictions on the held-out tail (indices past the training
    data), against a unigram model of the training tokens (add-one smoothed, so no token has probability 0)."""
    tail = data.length + torch.arange(data.held_out, dtype=torch.int64)
    counts = torch.zeros(model.cfg.vocab_size, dtype=torch.float64)
    for chunk in _batches(torch.arange(data.length, dtype=torch.int64)):
        counts += torch.bincount(data.targets(chunk).cpu(), minlength=model.cfg.vocab_size).double()
    unigram_bits = -torch.log2((counts + 1) / (counts.sum() + counts.numel()))
    correct, total_loss, total_unigram = 0, 0.0, 0.0
    for chunk in _batches(tail.to(model.device), model.cfg.vocab_size):
        targets = data.targets(chunk)
        logits = model(chunk)
        correct += int((logits.argmax(-1) == targets).sum())
        total_loss += float(F.cross_entropy(logits, targets, reduction="sum"))
        total_unigram += float(unigram_bits[targets.cpu()].sum())
    return {
        "tokens": data.held_out,
        "bits_per_token": total_loss / math.log(2) / data.held_out,
        "unigram_bits_per_token": total_unigram / data.held_out,
        "accuracy": correct / data.held_out,
        "unigram_accuracy": float((data.targets(tail) == int(counts.argmax())).double().mean()),
    }


def histogram(
    model: AUNN, data: Dataset, generator: torch.Generator
) -> tuple[dict[str, dict[str, float]], dict[str, float] | None]:
    """Fraction of each token among predictions past the data, beside its fraction in (a sample of) the data.

    Returns ({token name: {"training", "predicted"}}, other). The tokens seen in either are named most
    frequent first (by the larger of their two fractions; ties in vocabulary order), and other is None;
    where more than HISTOGRAM_TOKENS are seen, only the HISTOGRAM_TOKENS most frequent are named and
    other = {"tokens", "training", "predicted"} sums the rest.
    """
    vocab_size = model.cfg.vocab_size
    count = histogram_span(model, data)
    predicted = torch.bincount(predictions(model, data.length, count), minlength=vocab_size).double()
    sample = uniform_indices(data.length, min(data.length, HISTOGRAM_SPAN), generator)
    actual = torch.bincount(data.targets(sample).cpu(), minlength=vocab_size).double()
    predicted, actual = predicted / max(count, 1), actual / actual.sum()
    seen = torch.nonzero((predicted > 0) | (actual > 0)).flatten()
    seen = seen[torch.sort(torch.maximum(predicted[seen], actual[seen]), descending=True, stable=True).indices]
    other = None
    if seen.numel() > HISTOGRAM_TOKENS:
        seen, rest = seen[:HISTOGRAM_TOKENS], seen[HISTOGRAM_TOKENS:]
        other = {
            "tokens": rest.numel(),
            "training": float(actual[rest].sum()),
            "predicted": float(predicted[rest].sum()),
        }
    names = _token_names(model)
    return {names[i]: {"predicted": float(predicted[i]), "training": float(actual[i])} for i in seen.tolist()}, other


def _token_names(model: AUNN) -> list[str]:
    """Each token's name: its character, its byte (ASCII as itself, else hex), or its id as a number."""
    if isinstance(model.vocab, list):
        return list(model.vocab)
    if model.vocab is None:
        return [decode([i], None) if i < 128 else f"0x{i:02x}" for i in range(model.cfg.vocab_size)]
    return [str(i) for i in range(model.cfg.vocab_size)]


def valid_chunk_fraction(tokens: torch.Tensor) -> float:
    """Fraction of 4-token chunks (tokens [4k]) that read `|` then one letter three times."""
    chunks = tokens.reshape(-1, 4)
    valid = (chunks[:, 0] == 0) & (chunks[:, 1] > 0) & (chunks[:, 1:] == chunks[:, 1:2]).all(1)
    return float(valid.double().mean())


def extrapolation_windows(length: int, max_index: int) -> dict[str, tuple[int, int]]:
    """(start, size) of each extrapolation bin that lies within 0 .. max_index; every start is 4-aligned."""
    align = lambda i: (i + 3) // 4 * 4  # noqa: E731
    half = EXTRAPOLATION_WINDOW // 2
    boundary = 1 << (length + half).bit_length()  # a power of two with the whole window past the data
    windows = {
        "near": (align(length), NEAR_WINDOW),
        "1k": (align(length + 1_000), EXTRAPOLATION_WINDOW),
        "100k": (align(length + 100_000), EXTRAPOLATION_WINDOW),
        "10M": (align(length + 10_000_000), EXTRAPOLATION_WINDOW),
        "pow2_boundary": (boundary - half, EXTRAPOLATION_WINDOW),
    }
    return {name: (start, size) for name, (start, size) in windows.items() if start + size - 1 <= max_index}


def extrapolation(model: AUNN, data: ToyData) -> dict[str, Any]:
    """Per bin that fits in the model's index range, the fraction of chunks predicted as a valid `|xxx`;
    plus the chance level."""
    bins = {
        name: valid_chunk_fraction(predictions(model, start, size))
        for name, (start, size) in extrapolation_windows(data.length, model.cfg.max_index).items()
    }
    v = model.cfg.vocab_size
    bins["chance_uniform"] = (1 / v) * (v - 1) * (1 / v) ** 3
    return bins


def conditioning(
    model: AUNN, data: ToyData, trials: int, steps: int, lr: float, optimizer: str, generator: torch.Generator
) -> dict[str, Any]:
    """Teach `|` and a letter at a fresh chunk past the data; success when the chunk's last two predictions follow.

    The letter taught is always one the model did not already predict there, so a
    success is a real flip (e.g. `|aaa` to `|ccc`). Collateral drift is the training
    accuracy of the conditioned copies on a fixed sample of training indices.
    """
    sample = uniform_indices(data.length, min(data.length, 8192), generator).to(model.device)
    sample_targets = data.targets(sample)
    chunks_after = room_after(model, data) // 4  # trials spread over them; they may share one when few
    successes, drift, examples = 0, [], []
    for trial in range(trials):
        chunk_start = data.length + 4 * ((trial * 997 + 1) % chunks_after)
        before = predictions(model, chunk_start, 4)
        choices = [t for t in (1, 2, 3) if t != int(before[1])]
        letter = choices[int(torch.randint(0, len(choices), (1,), generator=generator))]
        prompt = torch.tensor([0, letter], dtype=torch.int64)
        tuned = condition(model, prompt, chunk_start, steps=steps, lr=lr, optimizer=optimizer)
        after = predictions(tuned, chunk_start, 4)
        success = bool((after[2:] == letter).all())
        successes += success
        with torch.no_grad():
            drift.append(float((tuned.predict(sample) == sample_targets).float().mean()))
        if trial < 5:
            examples.append(
                {
                    "index": chunk_start,
                    "taught": decode([0, letter], data.vocab),
                    "before": decode(before, data.vocab),
                    "after": decode(after, data.vocab),
                    "success": success,
                }
            )
    return {
        "success_rate": successes / trials,
        "trials": trials,
        "steps": steps,
        "lr": lr,
        "optimizer": optimizer,
        "train_accuracy_after": sum(drift) / len(drift),
        "examples": examples,
    }


def evaluate(
    model: AUNN,
    data: Dataset,
    seed: int = 0,
    condition_trials: int = 30,
    condition_steps: int = 1,
    condition_lr: float = 1e-3,
    condition_optimizer: str = "adam",
) -> dict[str, Any]:
    """Every metric of metrics.json for this model and dataset (extrapolation and conditioning: toy data only).

    What needs indices after the data covers those the model has (data that ends near 2**bits leaves
    few or none): histogram_predictions says how many predictions the histogram counts, windows
    past the largest index are left out of the extrapolation, and conditioning needs one chunk.
    """
    if condition_trials < 1 or condition_steps < 0:
        raise UserInputError(
            f"condition_trials must be >= 1 and condition_steps >= 0, got {condition_trials} and {condition_steps}"
        )
    generator = torch.Generator().manual_seed(seed)
    metrics: dict[str, Any] = {"data": data.describe(), "config": model.cfg.__dict__.copy()}
    metrics.update(fit(model, data, generator))
    metrics["histogram"], other = histogram(model, data, generator)
    metrics["histogram_predictions"] = histogram_span(model, data)
    if other is not None:
        metrics["histogram_other"] = other
    if isinstance(data, HeldOutTail):
        metrics["held_out"] = held_out_fit(model, data)
    if isinstance(data, ToyData):
        metrics["extrapolation"] = extrapolation(model, data)
        windows = extrapolation_windows(data.length, model.cfg.max_index)
        metrics["extrapolation_windows"] = {k: list(v) for k, v in windows.items()}
        if room_after(model, data) >= 4:
            metrics["conditioning"] = conditioning(
                model, data, condition_trials, condition_steps, condition_lr, condition_optimizer, generator
            )
    return metrics


def summary(metrics: dict[str, Any]) -> str:
    """The lines ``aunn eval`` and ``aunn demo`` print: fit, the most often predicted tokens (a list that ends
    in "..." and the count left out when it is cut), extrapolation, the held-out tail, the digits experiment and
    conditioning where measured."""
    lines = [
        f"training accuracy   {metrics['train_accuracy']:.4%}",
        f"training loss       {metrics['train_loss']:.5f} nats ({metrics['bits_per_token']:.5f} bits/token)",
    ]
    ranked = sorted(metrics["histogram"].items(), key=lambda item: -item[1]["predicted"])
    left_out = len(ranked) - SUMMARY_TOKENS + metrics.get("histogram_other", {}).get("tokens", 0)
    ids = metrics["data"].get("kind") == "tokens"  # token ids are shown as numbers, characters quoted
    hist = ", ".join(f"{t if ids else repr(t)}: {h['predicted']:.3f}" for t, h in ranked[:SUMMARY_TOKENS])
    if left_out > 0:
        hist += f", ... ({left_out:,} more tokens)"
    lines.append(f"predicted histogram {hist}")
    if "extrapolation" in metrics:
        ext = metrics["extrapolation"]
        lines.append("valid |xxx chunks   " + ", ".join(f"{k}: {v:.3f}" for k, v in ext.items()))
    if "held_out" in metrics:
        held = metrics["held_out"]
        lines.append(
            f"held-out tail       {held['bits_per_token']:.3f} bits/token over {held['tokens']} tokens "
            f"(unigram {held['unigram_bits_per_token']:.3f}); accuracy {held['accuracy']:.2%} "
            f"(unigram {held['unigram_accuracy']:.2%})"
        )
    if "digits" in metrics:
        dig = metrics["digits"]
        lines.append(
            f"generated digits    {dig['confident_share']:.1%} of {dig['generated']} recognised with "
            f"p >= {dig['confidence_threshold']}"
        )
        lines.append(
            f"inpainted digits    classifier accuracy {dig['inpainted_accuracy']:.1%} (bottom half blank: "
            f"{dig['blank_bottom_accuracy']:.1%}, real digits: {dig['truth_accuracy']:.1%}); bottom "
            f"pixels right {dig['bottom_pixel_accuracy']:.1%} (all blank: "
            f"{dig['blank_bottom_pixel_accuracy']:.1%})"
        )
    if "conditioning" in metrics:
        cond = metrics["conditioning"]
        lines.append(
            f"conditioning        {cond['success_rate']:.1%} success over {cond['trials']} trials "
            f"({cond['steps']} {cond['optimizer']} step(s), lr {cond['lr']}); training accuracy after "
            f"{cond['train_accuracy_after']:.4%}"
        )
        for e in cond["examples"][:3]:
            lines.append(f"    at {e['index']}: taught {e['taught']!r}: {e['before']!r} -> {e['after']!r}")
    return "\n".join(lines)
