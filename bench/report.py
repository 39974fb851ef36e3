"""results.json and results.md from the rows of a run."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import ceilings, cpu_ceiling
from .checks import TOLERANCES
from .configs import Case
from .harness import Row
from .workloads import SEED_RUN_STEPS, WORKLOADS


def build_meta(
    environment: dict[str, Any],
    cases: list[Case],
    quick: bool,
    argv: list[str],
    wall_s: float,
    ceiling_info: dict[str, Any] | str,
    complete: bool,
) -> dict[str, Any]:
    """results.json's meta: environment plus everything needed to read the rows.
    ``complete`` is False in the partial results saved while the run goes on."""
    return {
        **environment,
        "complete": complete,
        "quick": quick,
        "argv": argv,
        "wall_s": wall_s,
        "configs": {case.config_name: asdict(case.cfg) for case in cases},
        "workloads": {name: WORKLOADS[name].description for name in dict.fromkeys(c.workload for c in cases)},
        "tolerances": TOLERANCES,
        "error_metric": "max|x - ref| / max|ref| against the reference provider in fp32 (gradients: worst parameter)",
        "baselines": "vs_eager: reference provider in fp32; vs_compile: compile provider in fp32; same run",
        "timing": (
            "CUDA: triton.testing.do_bench median (device events); CPU: median of time.perf_counter; "
            "seed-run: ms/step over a stretch of consecutive full steps, each epoch's short step timed "
            f"apart (short_step_ms), projected over {SEED_RUN_STEPS:,} steps"
        ),
        "ceilings": ceiling_info,
    }


def write_json(path: Path, meta: dict[str, Any], rows: list[Row]) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _cells(row: Row, with_projection: bool, with_ceilings: bool, with_cpu_ceiling: bool = False) -> list[str]:
    head = [row["config"], f"{row['batch']:,}", row["provider"], row["precision"]]
    err = _num(row["max_rel_err"], ".1e")
    if row["error"]:
        speed = ["ERROR: " + row["error"].replace("|", "/")[:120]] + ["—"] * 3
    elif not row["correct"]:
        speed = ["INCORRECT", "—", "—", "—"]
    else:
        speed = [
            _num(row["ms"], ".4g"),
            _num(row["items_per_s"] / 1e6, ".4g"),
            _num(row["vs_eager"], ".2f") + ("x" if row["vs_eager"] else ""),
            _num(row["vs_compile"], ".2f") + ("x" if row["vs_compile"] else ""),
        ]
    cells = head + speed + [err, _num(row["first_call_s"], ".2f")]
    if with_projection:
        cells.append(_num(row["projected_s"], ".1f"))
    if with_ceilings:
        cells += [
            _num(row["sfu_share"] and 100 * row["sfu_share"], ".2f"),
            _num(row["tensor_core_share"] and 100 * row["tensor_core_share"], ".2f"),
        ]
    if with_cpu_ceiling:
        cells.append(_num(row.get("matmul_share") and 100 * row["matmul_share"], ".1f"))
    return cells


def _skipped_lines(rows: list[Row]) -> list[str]:
    grouped: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        grouped.setdefault((row["provider"], row["skipped"]), []).append(
            f"{row['config']} {row['batch']:,} {row['precision']}"
        )
    return [f"- skipped **{provider}**: {reason} ({'; '.join(cells)})" for (provider, reason), cells in grouped.items()]


def workload_table(workload: str, rows: list[Row], with_ceilings: bool, with_cpu_ceiling: bool = False) -> list[str]:
    """Markdown lines: a heading, one table of the rows that ran, then the skipped ones."""
    ran = [r for r in rows if not r["skipped"]]
    projection = WORKLOADS[workload].stretch
    header = [
        "config",
        "batch",
        "provider",
        "precision",
        "ms",
        "M idx/s",
        "vs eager",
        "vs compile",
        "max rel err",
        "first call s",
    ]
    if projection:
        header.append(f"projected s ({SEED_RUN_STEPS:,} steps)")
    if with_ceilings:
        header += ["% SFU ceiling", "% tensor-core ceiling"]
    if with_cpu_ceiling:
        header.append("% CPU matmul ceiling")
    lines = [f"## {workload}: {WORKLOADS[workload].description}", ""]
    if ran:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_cells(r, projection, with_ceilings, with_cpu_ceiling)) + " |" for r in ran]
    lines += [""] + _skipped_lines([r for r in rows if r["skipped"]])
    return lines + [""]


def write_markdown(path: Path, meta: dict[str, Any], rows: list[Row]) -> None:
    with_ceilings = any(r.get("sfu_share") is not None for r in rows)
    with_cpu_ceiling = "cpu_ceiling" in meta
    tolerances = ", ".join(f"{p} {t:g}" for p, t in meta["tolerances"].items())
    lines = [
        "# AUNN benchmark",
        "",
        f"- device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}",
        f"- commit {meta['commit']}, {meta['date']}, {'quick' if meta['quick'] else 'full'} run, "
        f"{meta['wall_s']:.0f} s wall, host load average {_num(meta['load_average'], '.1f')} at start"
        + ("" if meta["complete"] else " **(partial: the run had not finished)**"),
        "- configs: "
        + "; ".join(
            f"{name} (H={c['hidden']}, {c['layers']} layers, vocab {c['vocab_size']:,})"
            for name, c in meta["configs"].items()
        ),
        f"- correctness: {meta['error_metric']}; tolerance by precision: {tolerances}. "
        "INCORRECT rows are not timed and never enter a ratio.",
        f"- ratios: {meta['baselines']}",
        f"- timing: {meta['timing']}; first call s = the untimed first call (torch.compile / JIT time included)",
        f"- ceilings: {ceilings.summary(meta['ceilings'])}",
        *([f"- CPU ceiling: {cpu_ceiling.summary(meta['cpu_ceiling'])}"] if with_cpu_ceiling else []),
        "",
    ]
    for workload in meta["workloads"]:
        lines += workload_table(
            workload, [r for r in rows if r["workload"] == workload], with_ceilings, with_cpu_ceiling
        )
    path.write_text("\n".join(lines))
