"""Writes what ``aunn eval`` produces in a run directory: metrics.json, report.md and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import plots
from .data import Dataset, ToyData, decode
from .evaluate import EXTRAPOLATION_WINDOW, predictions, room_after
from .inference import condition
from .model import AUNN

PANEL_LINES = 3  # lines of tokens shown on each side of the end of the data
FAR = 10_000_000  # past_10M.png: how far past the data


def write_report(
    run_dir: Path, model: AUNN, data: Dataset, metrics: dict[str, Any], log_rows: list[dict[str, float]]
) -> list[Path]:
    """Write metrics.json, report.md and the plots into run_dir; returns the files written."""
    run_dir.mkdir(parents=True, exist_ok=True)
    written = [run_dir / "metrics.json"]
    written[0].write_text(json.dumps(metrics, indent=2) + "\n")
    images = _plots(run_dir, model, data, metrics, log_rows)
    written += images
    report = run_dir / "report.md"
    report.write_text(_markdown(model, data, metrics, images))
    written.append(report)
    return written


def _plots(
    run_dir: Path, model: AUNN, data: Dataset, metrics: dict[str, Any], log_rows: list[dict[str, float]]
) -> list[Path]:
    images = []
    if log_rows:
        images.append(run_dir / "loss.png")
        plots.loss_curve(log_rows, images[-1])
    vocab, vocab_size = model.vocab, model.cfg.vocab_size
    side = PANEL_LINES * plots.tokens_per_line(vocab)  # indices shown on each side of the end of the data
    room = room_after(model, data)
    start, after = max(0, data.length - side), min(side, room)
    predicted = predictions(model, start, data.length + after - start)
    truth = torch.cat(
        [data.targets(start + torch.arange(data.length - start)).cpu(), torch.full((after,), -1, dtype=torch.int64)]
    )
    images.append(run_dir / "end_of_data.png")
    plots.token_panel(
        {"data": truth, "predicted": predicted},
        start,
        vocab,
        vocab_size,
        "Data and predictions around the end of the data",
        images[-1],
        breaks={data.length: f"end of the data: predictions from index {data.length:,} on"},
        compare=("predicted", "data"),
    )
    if room >= FAR + side:
        far = data.length + FAR
        images.append(run_dir / "past_10M.png")
        plots.token_panel(
            {"predicted": predictions(model, far, side)},
            far,
            vocab,
            vocab_size,
            f"Predictions {FAR:,} indices past the end of the data (index {far:,} on)",
            images[-1],
        )
    images.append(run_dir / "histogram.png")
    plots.histogram(
        metrics["histogram"], images[-1], metrics["histogram_predictions"], vocab, metrics.get("histogram_other")
    )
    if isinstance(data, ToyData):
        images.append(run_dir / "extrapolation.png")
        plots.extrapolation(metrics["extrapolation"], images[-1])
        if "conditioning" in metrics:
            images.append(run_dir / "conditioning.png")
            _conditioning_plot(model, metrics["conditioning"], images[-1])
    return images


def _conditioning_plot(model: AUNN, cond: dict[str, Any], path: Path) -> None:
    example = cond["examples"][0]
    at = example["index"]
    prompt = torch.tensor([model.vocab.index(ch) for ch in example["taught"]], dtype=torch.int64)
    tuned = condition(model, prompt, at, steps=cond["steps"], lr=cond["lr"], optimizer=cond["optimizer"])
    start = max(0, at - 16)
    width = min(at + 20, model.cfg.max_index + 1) - start
    taught = torch.full((width,), -1, dtype=torch.int64)
    taught[at - start : at - start + len(prompt)] = prompt[: width - (at - start)]
    plots.token_panel(
        {"before": predictions(model, start, width), "taught": taught, "after": predictions(tuned, start, width)},
        start,
        model.vocab,
        model.cfg.vocab_size,
        f"Conditioning: {example['taught']!r} taught at index {at:,} "
        f"({cond['steps']} {cond['optimizer']} step(s), lr {cond['lr']}): predictions before and "
        "after",
        path,
        breaks={at: "the prompt"},
        compare=("after", "before"),
    )


def _markdown(model: AUNN, data: Dataset, metrics: dict[str, Any], images: list[Path]) -> str:
    lines = [
        "# AUNN evaluation report",
        "",
        f"Model: {model.cfg}",
        "",
        f"Data: {json.dumps(metrics['data'])}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| training accuracy | {metrics['train_accuracy']:.4%} (over {metrics['scored_indices']:,} indices) |",
        f"| training loss | {metrics['train_loss']:.5f} nats |",
        f"| bits per token | {metrics['bits_per_token']:.5f} |",
        "",
        f"## Token histogram ({metrics['histogram_predictions']:,} predictions after the data)",
        "",
        "| token | training | predicted |",
        "|---|---|---|",
    ]
    lines += [
        _row(repr(token), f"{h['training']:.3f}", f"{h['predicted']:.3f}") for token, h in metrics["histogram"].items()
    ]
    if "histogram_other" in metrics:
        other = metrics["histogram_other"]
        lines.append(_row(f"{other['tokens']:,} other tokens", f"{other['training']:.3f}", f"{other['predicted']:.3f}"))
    if "extrapolation" in metrics:
        windows = metrics["extrapolation_windows"]
        lines += [
            "",
            "## Extrapolation: fraction of valid `|xxx` chunks",
            "",
            "| window | first index | indices | valid |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {windows[name][0]:,} | {windows[name][1]:,} | {metrics['extrapolation'][name]:.3f} |"
            for name in windows
        ]
        lines += [
            f"| chance (uniform guesses) | | | {metrics['extrapolation']['chance_uniform']:.4f} |",
            "",
            f"Windows after `near` hold {EXTRAPOLATION_WINDOW:,} indices each; windows past the "
            f"model's largest index ({model.cfg.max_index:,}) are left out.",
        ]
    if "conditioning" in metrics:
        cond = metrics["conditioning"]
        lines += [
            "",
            "## Conditioning by backprop",
            "",
            f"{cond['trials']} trials on fresh copies, {cond['steps']} {cond['optimizer']} step(s) at lr "
            f"{cond['lr']}: success rate **{cond['success_rate']:.1%}**; training accuracy of the "
            f"conditioned copies {cond['train_accuracy_after']:.4%}.",
            "",
            "| index | taught | before | after | success |",
            "|---|---|---|---|---|",
        ]
        lines += [
            _row(f"{e['index']:,}", f"`{e['taught']}`", f"`{e['before']}`", f"`{e['after']}`", str(e["success"]))
            for e in cond["examples"]
        ]
    sample = decode(predictions(model, data.length, min(80, room_after(model, data))), model.vocab)
    lines += ["", "## Generated right after the data", "", "```", sample, "```", "", "## Plots", ""]
    lines += [f"![{image.stem}]({image.name})" for image in images]
    return "\n".join(lines) + "\n"


def _row(*cells: str) -> str:
    """A markdown table row; a `|` inside a cell is escaped (also inside code spans, as GitHub reads tables)."""
    return "| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |"
