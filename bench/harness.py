"""Run the plan: for every case, batch, provider and precision, check against the
reference, then time. Produces one result row (a JSON-ready dict) per cell.

Row fields: provider, workload, config, batch, precision, ms (median per call, or per
step for seed-run), items_per_s (indices/s), correct, max_rel_err, argmax_agreement
(predict), vs_eager, vs_compile, first_call_s (the first, untimed call: torch.compile
and JIT time), projected_s and short_step_ms (seed-run: the run's seconds, and the ms of each
epoch's last, shorter step), skipped (reason) and error (message). Speed
fields are null unless the row ran and was correct.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from aunn_fast import AUNN, AUNNConfig
from aunn_fast.backends import BACKENDS

from . import checks, timing
from .configs import Case
from .workloads import WORKLOADS, seed_run_seconds

EAGER, COMPILE = "reference", "compile"  # the baselines every ratio is taken against, in fp32
BASELINE_PRECISION = "fp32"
_MEMORY_HEADROOM = 0.8  # fraction of free device memory a cell may plan to use

Row = dict[str, Any]


@dataclass(frozen=True)
class Options:
    """device; providers/precisions: None for the defaults; quick: the short timing budget; seed: weights and inputs."""

    device: torch.device
    providers: list[str] | None = None
    precisions: list[str] | None = None
    quick: bool = False
    seed: int = 0


def unavailable_reason(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run on ``device``, or None. (The triton backend itself reports
    CPU as unavailable unless TRITON_INTERPRET=1.)"""
    try:
        return BACKENDS[provider].unavailable_reason(device)
    except Exception as exc:  # a broken backend is reported, not fatal
        return f"availability check failed: {type(exc).__name__}: {exc}"


def providers_to_run(requested: list[str] | None) -> list[str]:
    """Requested providers in the order given, each once (default: all, in BACKENDS order). Within
    each batch they run in this order: a time limit may cut the last ones."""
    if requested is None:
        return list(BACKENDS)
    unknown = [name for name in requested if name not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown provider(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    return list(dict.fromkeys(requested))


def precisions_for(provider: str, device: torch.device, requested: list[str] | None) -> list[str]:
    """fp32 on CPU; on CUDA fp32 and bf16 (compile: fp32 only, it is a baseline); or what was requested."""
    if requested is not None:
        return list(requested)
    if device.type != "cuda" or provider == COMPILE:
        return [BASELINE_PRECISION]
    return [p for p in (BASELINE_PRECISION, "bf16") if p in BACKENDS[provider].precisions]


def estimated_bytes(case: Case, batch: int) -> int:
    """Rough peak device memory of one cell: activations, logits, saved tensors and inputs."""
    cfg = case.cfg
    per_index = 4 * (cfg.bits + 6 * cfg.hidden + 3 * cfg.vocab_size) + 16 * 4
    if WORKLOADS[case.workload].check == "steps":
        per_index += 4 * (6 * cfg.layers * cfg.hidden + 2 * cfg.vocab_size)
    return per_index * batch


def _fit_reason(case: Case, batch: int, device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    need = estimated_bytes(case, batch)
    if need > _MEMORY_HEADROOM * free:
        return f"would not fit in memory (~{need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free)"
    return None


def _blank_row(provider: str, case: Case, batch: int, precision: str) -> Row:
    return {
        "provider": provider,
        "workload": case.workload,
        "config": case.config_name,
        "batch": batch,
        "precision": precision,
        "ms": None,
        "items_per_s": None,
        "correct": None,
        "max_rel_err": None,
        "argmax_agreement": None,
        "vs_eager": None,
        "vs_compile": None,
        "first_call_s": None,
        "projected_s": None,
        "short_step_ms": None,
        "skipped": None,
        "error": None,
    }


def nontrivial_model(cfg: AUNNConfig, seed: int) -> AUNN:
    """The seeded model with biases ~ 0.1 N(0, 1) and gains ~ 1 + 0.1 N(0, 1), not the init's zeros and
    ones: checked against the reference, a path that dropped a bias or a gain must give a wrong answer."""
    model = AUNN(cfg, backend=EAGER, precision=BASELINE_PRECISION, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "gain")):
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def _configured(base: AUNN, provider: str, precision: str) -> AUNN:
    model = copy.deepcopy(base)
    model.backend, model.precision, model.validate = provider, precision, False
    return model


def measure(row: Row, case: Case, base: AUNN, options: Options) -> None:
    """Fill ``row``: first call, correctness, then (only if correct) timing."""
    device, workload = options.device, WORKLOADS[case.workload]
    batch, provider, precision = row["batch"], row["provider"], row["precision"]
    budget = timing.QUICK if options.quick else timing.FULL
    generator = torch.Generator(device=device).manual_seed(options.seed + batch)  # same inputs for every provider
    prepared = workload.prepare(_configured(base, provider, precision), batch, generator)
    row["first_call_s"] = timing.wall_s(prepared.step, device)
    model = _configured(base, provider, precision)
    if workload.check == "steps":
        result = checks.check_steps(workload.prepare, model, batch, options.seed + batch, checks.TOLERANCES[precision])
    else:
        result = checks.check(workload.check, model, prepared.idx, prepared.targets, precision)
    result = checks.honours(result, precision)
    row.update(correct=result.correct, max_rel_err=result.max_rel_err, argmax_agreement=result.argmax_agreement)
    if not result.correct:
        return
    if workload.stretch:
        ms = timing.stretch_ms(prepared.step, device, budget.stretch_steps)
        if prepared.short_step is not None:
            row["short_step_ms"] = timing.stretch_ms(prepared.short_step, device, budget.stretch_steps)
        row["projected_s"] = seed_run_seconds(batch, ms, row["short_step_ms"])
    elif workload.latency:
        ms = timing.latency_ms(prepared.step, device, budget)
    else:
        ms = timing.median_ms(prepared.step, device, budget)
    row.update(ms=ms, items_per_s=batch / (ms / 1e3))


def run_cell(row: Row, case: Case, base: AUNN, options: Options) -> None:
    """:func:`measure`, recording out-of-memory as skipped and any other failure as an incorrect row."""
    try:
        measure(row, case, base, options)
    except torch.OutOfMemoryError:
        row.update(skipped="out of memory", correct=None, ms=None, items_per_s=None)
    except Exception as exc:  # one failing provider must not end the run
        message = str(exc).strip().splitlines()
        row.update(
            correct=False,
            error=f"{type(exc).__name__}: {message[0] if message else ''}"[:500],
            ms=None,
            items_per_s=None,
            projected_s=None,
            short_step_ms=None,
        )
    finally:
        if options.device.type == "cuda":
            torch.cuda.empty_cache()


def add_ratios(rows: list[Row]) -> None:
    """vs_eager / vs_compile = baseline ms / row ms, from the same run's correct fp32 baselines."""
    baselines: dict[tuple[Any, ...], float] = {}
    for row in rows:
        if row["provider"] in (EAGER, COMPILE) and row["precision"] == BASELINE_PRECISION and row["ms"]:
            baselines[(row["provider"], row["workload"], row["config"], row["batch"])] = row["ms"]
    for row in rows:
        if not row["ms"]:
            continue
        for field, provider in (("vs_eager", EAGER), ("vs_compile", COMPILE)):
            base_ms = baselines.get((provider, row["workload"], row["config"], row["batch"]))
            row[field] = base_ms / row["ms"] if base_ms else None


def _allow_recompiles() -> None:
    """torch.compile recompiles per batch size and precision; the default limit (8) would silently
    fall back to eager in a sweep."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))


def _describe(row: Row) -> str:
    head = f"{row['config']:>8} {row['workload']:<9} batch={row['batch']:<9} {row['provider']}/{row['precision']}"
    if row["skipped"]:
        return f"{head}: skipped ({row['skipped']})"
    if row["error"]:
        return f"{head}: ERROR {row['error']}"
    if not row["correct"]:
        return f"{head}: INCORRECT (max_rel_err {row['max_rel_err']:.2e})"
    return (
        f"{head}: {row['ms']:.4g} ms, {row['items_per_s'] / 1e6:.4g} M/s "
        f"(first call {row['first_call_s']:.2f} s, err {row['max_rel_err']:.1e})"
    )


def run(
    cases: list[Case],
    options: Options,
    log: Callable[[str], None] = print,
    progress: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Every case x batch x provider x precision; rows in that order, ratios filled in.
    ``progress`` is called with the rows so far after each one (e.g. to save partial results)."""
    _allow_recompiles()
    providers = providers_to_run(options.providers)
    reasons = {name: unavailable_reason(name, options.device) for name in providers}
    rows: list[Row] = []
    bases: dict[str, AUNN] = {}
    for case in cases:
        if case.config_name not in bases:
            bases[case.config_name] = nontrivial_model(case.cfg, options.seed).to(options.device)
        for batch in case.batches:
            if WORKLOADS[case.workload].cuda_only and options.device.type != "cuda":
                fit = "this workload needs a CUDA device"
            else:
                fit = _fit_reason(case, batch, options.device)
            for provider in providers:
                for precision in precisions_for(provider, options.device, options.precisions):
                    row = _blank_row(provider, case, batch, precision)
                    if precision not in BACKENDS[provider].precisions:
                        row["skipped"] = f"precision {precision} is not offered by this backend"
                    else:
                        row["skipped"] = reasons[provider] or fit
                    if not row["skipped"]:
                        run_cell(row, case, bases[case.config_name], options)
                    log(_describe(row))
                    rows.append(row)
                    if progress:
                        progress(rows)
    add_ratios(rows)
    return rows
