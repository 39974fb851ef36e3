"""Tests of the benchmark harness (aunn_fast.bench): schema, correctness gating, skips.

Nothing here asserts on speed."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aunn_fast import AUNNConfig, kernels, reference
from aunn_fast.backends import BACKENDS, Backend
from aunn_fast.bench import ceilings, harness, run
from aunn_fast.bench.configs import Case
from aunn_fast.config import PRECISIONS

REPO = Path(__file__).resolve().parent.parent
TINY = AUNNConfig(vocab_size=4, hidden=16, layers=3, bits=64)
ROW_FIELDS = {
    "provider",
    "workload",
    "config",
    "batch",
    "precision",
    "ms",
    "items_per_s",
    "correct",
    "max_rel_err",
    "vs_eager",
    "vs_compile",
    "skipped",
    "first_call_s",
    "sfu_share",
    "tensor_core_share",
}
META_FIELDS = {"device", "torch", "triton", "python", "commit", "date", "tolerances", "configs"}


def _wrong_logits(idx, params, cfg, precision="fp32"):
    return reference.logits(idx, params, cfg, precision) * 1.05 + 0.1


def _wrong_loss(idx, targets, params, cfg, precision="fp32", reduction="mean"):
    return F.cross_entropy(_wrong_logits(idx, params, cfg, precision), targets, reduction=reduction)


def _wrong_predict(idx, params, cfg, precision="fp32"):
    return _wrong_logits(idx, params, cfg, precision).argmax(-1)


def _always(device):
    return None


def _never(device):
    return "needs hardware this machine lacks"


@pytest.fixture
def fake_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """'wrong' gives perturbed logits, loss and gradients; 'absent' is never available."""
    monkeypatch.setitem(
        BACKENDS, "wrong", Backend("wrong", _wrong_logits, _wrong_loss, _wrong_predict, PRECISIONS, _always)
    )
    monkeypatch.setitem(
        BACKENDS, "absent", Backend("absent", _wrong_logits, _wrong_loss, _wrong_predict, PRECISIONS, _never)
    )


def test_script_writes_results_markdown_and_plots(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "aunn_fast.bench.run",
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path),
            "--providers",
            "reference,triton",
            "--batches",
            "64",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )  # a hang, not a speed limit: ~15 s idle, far more on a loaded machine
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    assert META_FIELDS <= set(data["meta"])
    rows = data["rows"]
    assert {r["workload"] for r in rows} == {
        "predict",
        "loss",
        "train",
        "train-graph",
        "condition",
        "condition-graph",
        "seed-run",
        "seed-run-graph",
    }
    for row in rows:
        assert ROW_FIELDS <= set(row)
        if row["workload"].endswith("-graph") and row["provider"] == "reference":
            assert row["skipped"] == "this workload needs a CUDA device" and row["ms"] is None
        elif row["provider"] == "reference":
            assert row["correct"] and row["ms"] > 0 and row["items_per_s"] > 0 and row["vs_eager"] == 1.0
            assert row["vs_compile"] is None  # compile was not run
        else:
            assert row["skipped"] and row["ms"] is None
    seed_run = next(r for r in rows if r["workload"] == "seed-run" and r["provider"] == "reference")
    assert seed_run["batch"] == 2048 and seed_run["short_step_ms"] > 0
    assert seed_run["projected_s"] == pytest.approx((195 * seed_run["ms"] + seed_run["short_step_ms"]) / 2)
    md = (tmp_path / "results.md").read_text()
    for workload in ("predict", "loss", "train", "condition", "seed-run"):
        assert f"## {workload}" in md
        assert (tmp_path / f"throughput_{workload}.png").stat().st_size > 0
    assert "skipped **triton**" in md and "no ceiling is defined" in md


def test_incorrect_provider_is_marked_and_never_timed(fake_backends: None) -> None:
    cases = [Case("tiny", TINY, workload, (64,)) for workload in ("predict", "loss", "train")]
    options = harness.Options(torch.device("cpu"), ["reference", "wrong", "absent"], quick=True)
    rows = harness.run(cases, options, log=lambda line: None)
    wrong = [r for r in rows if r["provider"] == "wrong"]
    assert len(wrong) == 3
    for row in wrong:
        assert row["correct"] is False and row["max_rel_err"] > harness.checks.TOLERANCES["fp32"]
        assert row["ms"] is None and row["items_per_s"] is None and row["vs_eager"] is None
    for row in (r for r in rows if r["provider"] == "reference"):
        assert row["correct"] is True and row["max_rel_err"] < 1e-6 and row["vs_eager"] == 1.0
    for row in (r for r in rows if r["provider"] == "absent"):
        assert row["skipped"] == "needs hardware this machine lacks" and row["correct"] is None


def test_main_reports_incorrect_in_markdown_and_exit_status(fake_backends: None, tmp_path: Path) -> None:
    status = run.main(
        [
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path),
            "--configs",
            "seed",
            "--workloads",
            "predict",
            "--batches",
            "32",
            "--providers",
            "reference,wrong,absent",
        ]
    )
    assert status == 1
    md = (tmp_path / "results.md").read_text()
    assert "INCORRECT" in md and "needs hardware this machine lacks" in md
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["correct"] for r in rows] == [True, False, None]


def test_ratios_ignore_incorrect_baselines() -> None:
    def row(provider: str, ms: float | None, correct: bool) -> harness.Row:
        return {
            "provider": provider,
            "workload": "predict",
            "config": "seed",
            "batch": 8,
            "precision": "fp32",
            "ms": ms,
            "correct": correct,
            "vs_eager": None,
            "vs_compile": None,
        }

    rows = [row("reference", 4.0, True), row("compile", None, False), row("fast", 1.0, True)]
    harness.add_ratios(rows)
    assert rows[2]["vs_eager"] == 4.0 and rows[2]["vs_compile"] is None


def test_triton_on_cpu_is_skipped_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert harness.unavailable_reason("triton", torch.device("cpu"))


def test_ceilings_match_the_datasheet_estimates() -> None:
    seed = AUNNConfig(vocab_size=4, hidden=64, layers=8, bits=64)
    assert ceilings.ceilings(seed, "forward").sfu == pytest.approx(4.7e9, rel=0.02)
    assert ceilings.ceilings(seed, "train").sfu == pytest.approx(2.3e9, rel=0.02)
    assert ceilings.ceilings(seed, "forward").tensor_core == pytest.approx(989e12 / (2 * (64 * 64 * 7 + 64 * 4)))
    assert ceilings.applies_to("cuda", "NVIDIA H100 80GB HBM3")
    assert not ceilings.applies_to("cpu", "AMD EPYC (2 cores)")
    assert not ceilings.applies_to("cuda", "NVIDIA A100-SXM4-80GB")


def test_batch_sizes_parse_suffixes() -> None:
    assert run.parse_args(["--batches", "1,64K,1M"]).batches == (1, 65536, 1 << 20)


def test_ceiling_shares_are_plotted_for_h100_rows(tmp_path: Path) -> None:
    from aunn_fast.bench import plots

    seed = AUNNConfig(vocab_size=4, hidden=64, layers=8, bits=64)
    rows = [
        {
            "provider": "reference",
            "precision": "fp32",
            "workload": workload,
            "config": "seed",
            "batch": batch,
            "items_per_s": 1e8 * batch.bit_length(),
            "correct": True,
        }
        for workload in ("predict", "train", "condition")
        for batch in (2048, 65536)
    ]
    ceilings.add_shares(rows, {"seed": seed}, defined=True)
    assert rows[0]["sfu_share"] == pytest.approx(rows[0]["items_per_s"] / ceilings.ceilings(seed, "forward").sfu)
    assert all(r["sfu_share"] is None for r in rows if r["workload"] == "condition")
    assert plots.ceiling_shares(rows, tmp_path, "NVIDIA H100 80GB HBM3") == [tmp_path / "ceiling_share.png"]


def test_kernel_variants_check_then_time_and_report_failures():
    """Each candidate is checked, then timed with its own options; one that raises is a row with its error.
    An unknown method is refused when the candidate is made."""
    reason = kernels.unavailable_reason(torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    from aunn_fast.bench import kernel_variants as kv

    with pytest.raises(ValueError, match="atomics"):
        kv.variant("bogus", "atomics")
    plan = [
        kv.Step(
            "predict",
            "tiny",
            16,
            37,
            "fp32",
            [kv.variant("default"), kv.variant("32 rows, 2 warps", tiles=(("block_m", 32), ("num_warps", 2)))],
        ),
        kv.Step(
            "train",
            "tiny",
            16,
            37,
            "fp32",
            [
                kv.variant("partials", "partials", partial_programs_per_sm=1),
                kv.variant("layer-wise", fused_max_hidden=0),
                kv.variant("split", split_k_min_rows=8),
                kv.variant("head kernel", head_grads_in_trunk=False),
                kv.variant("weight as W.T", load_weight_once=False),
                kv.variant("bogus", tiles=(("block_m", 3),)),
            ],
        ),  # not a power of two: Triton refuses it
        kv.Step(
            "train",
            "tiny-vocab",
            16,
            5,
            "fp32",
            [
                kv.variant("ranges", vocab_split_min=0),
                kv.variant("products", vocab_split_min=0, head_backward="products"),
            ],
            vocab=300,
        ),
    ]
    rows = kv.run(plan, torch.device("cpu"), log=lambda *_: None)
    assert [(r["workload"], r["variant"]) for r in rows] == [
        ("predict", "default"),
        ("predict", "32 rows, 2 warps"),
        ("train", "partials"),
        ("train", "layer-wise"),
        ("train", "split"),
        ("train", "head kernel"),
        ("train", "weight as W.T"),
        ("train", "bogus"),
        ("train", "ranges"),
        ("train", "products"),
    ]
    for r in [*rows[:7], *rows[8:]]:
        assert r["correct"] and r["error"] is None and r["ms"] > 0, r
        assert r["max_rel_err"] < 1e-5, r  # fp32 candidates: the package's fp32 tolerance
    assert rows[7]["error"] and rows[7]["ms"] is None
    table = kv.markdown({"device": "cpu", "torch": "-", "triton": "-", "commit": "-", "date": "-"}, rows)
    assert "| train | tiny | 16 | 37 | fp32 | bogus | — | ERROR |" in table


def test_kernel_variants_compare_candidates_at_the_timed_batch(monkeypatch):
    """Past the rows checked against the reference, a candidate must still agree with the default: here one
    whose gradients double once the batch exceeds the checked rows."""
    from aunn_fast.bench import kernel_variants as kv

    error_fn, prepare, differ = kv.WORKLOADS["train"]

    def doubling_past_the_check(cfg, params, idx, targets, precision, options):
        call = prepare(cfg, params, idx, targets, precision, options)
        broken = options.tiles and idx.numel() > kv.CHECK_ROWS
        return (lambda: [2 * g for g in call()]) if broken else call

    monkeypatch.setitem(kv.WORKLOADS, "train", (error_fn, doubling_past_the_check, differ))
    monkeypatch.setattr(kv, "CHECK_ROWS", 16)
    plan = [
        kv.Step(
            "train", "tiny", 16, 40, "fp32", [kv.variant("default"), kv.variant("2 warps", tiles=(("num_warps", 2),))]
        )
    ]
    rows = kv.run(plan, torch.device("cpu"), log=lambda *_: None)
    assert rows[0]["correct"] and rows[0]["ms"] > 0
    assert rows[1]["correct"] is False and rows[1]["error"] == "differs from default at batch 40"
    assert rows[1]["ms"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_kernel_variants_graph_replays_the_eager_gradients():
    """The train-graph workload's replay writes the gradients of the inputs as they are at replay time,
    as the eager call computes them (outputs poisoned before each replay)."""
    from aunn_fast.bench import kernel_variants as kv

    cfg, params, idx, targets = kv.make_inputs(64, 4096, torch.device("cuda"))
    options = kv.variant("default").options
    replay = kv.graphed_loss_grads(cfg, params, idx, targets, "bf16", options)
    for _ in range(2):
        for g in replay():
            g.fill_(float("nan"))
        got = [g.clone() for g in replay()]
        want = kv.loss_grads(kv.kernels_loss(options), idx, targets, params, cfg, "bf16")
        assert not kv.gradients_differ(got, want, "fp32")
        idx.copy_(torch.randint(0, 2**62, idx.shape, device=idx.device))  # the graph reads idx where it lies


def test_kernel_variants_plan_skips_the_default_tiles():
    """A row-block candidate (backward or forward) equal to the width's default would time the default twice."""
    pytest.importorskip("triton")
    from aunn_fast.bench import kernel_variants as kv

    labels = {(s.shape, s.batch, s.precision): [v.label for v in s.variants] for s in kv.default_plan([2])}
    assert "torch + tanh, bwd 64 rows 4 warps" not in labels["seed", 1 << 20, "bf16"]  # H = 64's default
    assert "torch + tanh, bwd 32 rows 4 warps" in labels["seed", 1 << 20, "bf16"]
    assert "torch + tanh, bwd 32 rows 4 warps" not in labels["H128", 1 << 19, "bf16"]  # and H = 128's
    assert "torch + tanh, bwd 16 rows 8 warps" in labels["H128", 1 << 19, "bf16"]
    assert "layer-wise" in labels["H128", 1 << 19, "bf16"]
    assert labels["seed", 1 << 24, "fp32"] == ["default", "ieee"]  # fp32's products: tensor cores or FMAs
    assert "ieee" in labels["seed", 1 << 20, "fp32"]
    assert "torch + tanh + head kernel" in labels["seed", 8192, "bf16"]
    assert "torch + tanh + weight as W.T" in labels["H128", 1 << 19, "bf16"]
    assert "torch + tanh, bwd 128 rows 8 warps" not in labels["H128", 1 << 19, "bf16"]  # 256 KB of shared memory
    assert "partials + tanh, bwd 128 rows 8 warps" in labels["seed", 1 << 20, "bf16"]
    assert "partials + tanh, bwd 128 rows 8 warps" not in labels["H128", 1 << 19, "bf16"]  # does not compile
    assert "tanh + 2 stages, 96 registers" in labels["seed", 1 << 24, "bf16"]
    assert "128 rows, 4 warps + tanh" not in labels["H128", 1 << 22, "bf16"]  # spills 0.8 KB there
    for shape, batch in (("seed", 1 << 24), ("H128", 1 << 22)):  # the forward's default tiles at both widths
        assert "64 rows, 4 warps + tanh" not in labels[shape, batch, "bf16"]
        assert "64 rows, 8 warps + tanh" in labels[shape, batch, "bf16"]


def test_kernel_variant_is_a_configuration():
    """A candidate is a KernelOptions value: its changes, and the defaults (the "torch" weight gradients, the
    exact sigmoid) elsewhere; nothing in the kernels' modules changes."""
    pytest.importorskip("triton")
    from aunn_fast.bench import kernel_variants as kv

    candidate = kv.variant("tf32x3", fp32_products="tf32x3", tiles=(("block_m", 32),))
    assert candidate.options == kv.KernelOptions(
        fp32_products="tf32x3", sigmoid="exact", tiles=(("block_m", 32),), weight_grad="torch"
    )


def test_kernel_variants_labels_keep_the_named_candidates(tmp_path, capsys, monkeypatch):
    """--labels narrows every step to the named candidates (the bf16 weight copies' comparison here); a
    filter that keeps nothing is a usage error, before any GPU is asked for."""
    pytest.importorskip("triton")
    from aunn_fast.bench import kernel_variants as kv

    kept = []
    monkeypatch.setattr(kv, "run", lambda plan, device, on_row: kept.extend(plan) or [])
    monkeypatch.setattr(kv.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kv.kernels, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(kv, "describe", lambda device: {})
    labels = "torch + tanh; torch + tanh, bwd 32 rows 8 warps;torch + tanh + fp32 weights"
    assert (
        kv.main(
            [
                "--out",
                str(tmp_path),
                "--workloads",
                "train",
                "--shapes",
                "seed",
                "--precisions",
                "bf16",
                "--labels",
                labels,
            ]
        )
        == 0
    )
    wanted = ["torch + tanh", "torch + tanh + fp32 weights", "torch + tanh, bwd 32 rows 8 warps"]  # plan order
    assert kept and all([v.label for v in s.variants] == wanted for s in kept)
    copies = kept[0].variants[1]
    assert copies.options.sigmoid == "tanh" and copies.options.weight_copy_min_rows > kept[0].batch
    with pytest.raises(SystemExit) as exit_info:
        kv.main(["--out", str(tmp_path / "none"), "--labels", "nothing like it"])
    assert exit_info.value.code == 2 and "no step" in capsys.readouterr().err


def test_gpu_check_selects_candidates_the_plan_has():
    """gpu_check.sh's kernel_variants filters name steps and candidates of the plan: a label renamed in the
    plan would leave the lease's variants stage with nothing to time (or time only part of what it should)."""
    pytest.importorskip("triton")
    import re
    import shlex

    from aunn_fast.bench import kernel_variants as kv

    script = (Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh").read_text()
    call = re.search(r"aunn_fast\.bench\.kernel_variants (.*?)\nVARIANTS_RC", script, re.S).group(1)
    args = shlex.split(call.replace("\\\n", ""))  # a backslash-newline joins lines, as in bash
    option = {name: args[args.index(name) + 1] for name in ("--workloads", "--shapes", "--precisions", "--labels")}
    steps = [
        s
        for s in kv.default_plan([2])
        if s.workload in option["--workloads"].split(",")
        and s.shape in option["--shapes"].split(",")
        and s.precision in option["--precisions"].split(",")
    ]
    offered = {v.label for s in steps for v in s.variants}
    wanted = option["--labels"].split(";")
    assert steps and set(wanted) <= offered


def test_providers_run_in_the_order_given():
    """gpu_check puts the fused kernels first, so a time limit cuts torch.compile, not them."""
    assert harness.providers_to_run(None) == list(BACKENDS)
    assert harness.providers_to_run(["triton", "reference", "compile", "triton"]) == ["triton", "reference", "compile"]
    with pytest.raises(ValueError, match="unknown provider"):
        harness.providers_to_run(["cublas"])


@pytest.mark.parametrize(
    "workload, optimizer, batch", [("train", "adamw", 64), ("condition", "sgd", 2), ("seed-run", "adamw", 2048)]
)
def test_each_training_workload_step_is_the_eager_step_it_claims(workload, optimizer, batch, monkeypatch):
    """Three timed steps of the workload against zero_grad + backward + one optimizer step, replayed on a
    twin from the inputs each step used: the same weights and gradients (a step that skipped zero_grad, the
    backward or the optimizer, or stepped twice, would differ)."""
    from aunn_fast.bench import workloads

    model = harness.nontrivial_model(TINY, seed=3)
    twin = copy.deepcopy(model)
    seen = []
    original_loss = model.loss
    monkeypatch.setattr(model, "loss", lambda idx, targets: seen.append((idx, targets)) or original_loss(idx, targets))
    step = workloads.WORKLOADS[workload].prepare(model, batch, torch.Generator().manual_seed(7)).step
    twin_optimizer = workloads.benchmark_optimizer(twin, optimizer)
    for _ in range(3):
        step()
        idx, targets = seen[-1]
        assert idx.shape == (batch,)
        twin_optimizer.zero_grad(set_to_none=True)
        twin.loss(idx, targets).backward()
        twin_optimizer.step()
    assert len(seen) == 3
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)


def _stale_backend(monkeypatch):
    """'stale': the reference computed with the weights it saw first (gradients still reach the live ones)."""
    cache = {}

    def stale(params):
        kept = cache.setdefault("params", [p.detach().clone() for p in params])
        return type(params)(*[p + (k - p).detach() for p, k in zip(params, kept)])

    monkeypatch.setitem(
        BACKENDS,
        "stale",
        Backend(
            "stale",
            lambda idx, params, *a: reference.logits(idx, stale(params), *a),
            lambda idx, targets, params, *a: reference.loss(idx, targets, stale(params), *a),
            lambda idx, params, *a: reference.predict(idx, stale(params), *a),
            PRECISIONS,
            _always,
        ),
    )


def test_the_step_check_sees_state_kept_between_steps(monkeypatch):
    """A provider that keeps using the weights of its first call is right at step 1 and wrong after."""
    from aunn_fast.bench import checks, workloads

    _stale_backend(monkeypatch)
    model = harness.nontrivial_model(TINY, seed=3)
    model.backend = "stale"
    prepare = workloads.WORKLOADS["train"].prepare
    result = checks.check_steps(prepare, model, 64, seed=5, tolerance=checks.TOLERANCES["fp32"])
    assert not result.correct and result.max_rel_err > checks.TOLERANCES["fp32"]
    model.backend = "reference"
    assert checks.check_steps(prepare, model, 64, seed=5, tolerance=checks.TOLERANCES["fp32"]).correct


def test_a_reduced_precision_that_left_no_trace_is_incorrect():
    from aunn_fast.bench import checks

    exact = checks.CheckResult(True, 0.0)
    assert checks.honours(exact, "fp32").correct
    assert not checks.honours(exact, "bf16").correct and not checks.honours(exact, "tf32").correct
    assert checks.honours(checks.CheckResult(True, 3e-3), "bf16").correct


def _biasless_logits(idx, params, cfg, precision="fp32"):
    """The reference with every bias taken as 0 and every gain as 1: right only on freshly initialised weights."""
    plain = type(params)(
        *[
            torch.zeros_like(p) if name.endswith("bias") else torch.ones_like(p) if name.endswith("gain") else p
            for name, p in zip(params._fields, params)
        ]
    )
    return reference.logits(idx, plain, cfg, precision)


def test_checks_run_on_nontrivial_biases_and_gains(monkeypatch):
    def loss(idx, targets, params, cfg, precision="fp32", reduction="mean"):
        return F.cross_entropy(_biasless_logits(idx, params, cfg, precision), targets, reduction=reduction)

    monkeypatch.setitem(
        BACKENDS,
        "biasless",
        Backend("biasless", _biasless_logits, loss, lambda *a: _biasless_logits(*a).argmax(-1), PRECISIONS, _always),
    )
    cases = [Case("tiny", TINY, workload, (64,)) for workload in ("predict", "loss", "train")]
    rows = harness.run(
        cases, harness.Options(torch.device("cpu"), ["reference", "biasless"], quick=True), log=lambda line: None
    )
    assert [(r["provider"], r["correct"]) for r in rows] == [("reference", True), ("biasless", False)] * 3


def test_the_loss_check_compares_every_row(monkeypatch):
    """A loss whose mean is right but whose rows are not (here: rows permuted) is incorrect."""

    def loss(idx, targets, params, cfg, precision="fp32", reduction="mean"):
        rows = reference.loss(idx, targets, params, cfg, precision, "none").flip(0)
        return {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]

    monkeypatch.setitem(
        BACKENDS, "shuffled", Backend("shuffled", reference.logits, loss, reference.predict, PRECISIONS, _always)
    )
    rows = harness.run(
        [Case("tiny", TINY, "loss", (64,))],
        harness.Options(torch.device("cpu"), ["reference", "shuffled"], quick=True),
        log=lambda line: None,
    )
    assert [r["correct"] for r in rows] == [True, False]


@pytest.mark.parametrize(
    "bad, expected",
    [
        (["--providers", "reference,cublas"], "unknown provider(s) cublas"),
        (["--workloads", "fit"], "unknown workload"),
        (["--configs", "huge"], "unknown configuration"),
        (["--precisions", "fp16"], "unknown precision(s) fp16"),
        (["--batches", "0"], "integers >= 1"),
        (["--batches", "-4"], "integers >= 1"),
    ],
)
def test_bad_options_fail_before_anything_is_created(tmp_path: Path, capsys, bad, expected) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "out"), *bad])
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_is_a_file_is_a_usage_error(tmp_path: Path, capsys) -> None:
    from aunn_fast.bench import kernel_variants, profile_step

    taken = tmp_path / "results"
    taken.write_text("not a folder")
    for main in (run.main, profile_step.main, kernel_variants.main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--out", str(taken)])
        assert exit_info.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err
    assert taken.read_text() == "not a folder"


@pytest.mark.parametrize(
    "bad, expected",
    [
        (["--configs", "seed,huge"], "unknown configuration(s) huge"),
        (["--precisions", "fp16"], "unknown precision(s) fp16"),
        (["--tiles", "block_hc=256,bloc_v=64"], "'bloc_v=64': expected FIELD"),
        (["--tiles", "block_hc=wide"], "'block_hc=wide': expected FIELD"),
    ],
)
def test_compile_check_refuses_unknown_names(capsys, bad, expected) -> None:
    from aunn_fast.bench import compile_check

    with pytest.raises(SystemExit) as exit_info:
        compile_check.main(bad)
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_kernel_variants_programs_per_sm_are_counts(capsys) -> None:
    from aunn_fast.bench import kernel_variants

    for bad in ("2,x", "0", ""):
        with pytest.raises(SystemExit) as exit_info:
            kernel_variants.main(["--out", "unused", "--programs-per-sm", bad])
        assert exit_info.value.code == 2 and "integers >= 1" in capsys.readouterr().err


def test_profile_step_writes_a_table_and_a_trace(tmp_path, capsys):
    """The profiler tool on a CPU: the report names the workload and its operators; the trace is JSON."""
    from aunn_fast.bench import profile_step

    argv = [
        "--config",
        "seed",
        "--workloads",
        "train,predict",
        "--batches",
        "64,33",
        "--provider",
        "reference",
        "--precision",
        "fp32",
        "--calls",
        "2",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    assert profile_step.main(argv) == 0
    text = (tmp_path / "profile_seed_train_64_reference_fp32.txt").read_text()
    assert "workload train, batch 64" in text and "ms per call" in text and "aten::mm" in text
    assert "Optimizer.step#AdamW.step" in text
    assert "traceEvents" in json.loads((tmp_path / "profile_seed_predict_33_reference_fp32.json").read_text())
    for bad in (
        ["--workloads", "train,predict", "--batches", "64"],
        ["--workloads", "nope", "--batches", "4"],
        ["--workloads", "train", "--batches", "0"],
        ["--workloads", "train", "--batches", "x"],
        ["--workloads", "train-graph", "--batches", "4", "--device", "cpu"],
    ):
        with pytest.raises(SystemExit):
            profile_step.main([*bad, "--out", str(tmp_path / "bad")])
        assert not (tmp_path / "bad").exists()


def test_profile_step_without_the_profiler_writes_nothing(tmp_path, capsys):
    """--no-profiler (a target for ncu) runs the calls and prints their wall time; --out is then optional."""
    from aunn_fast.bench import profile_step

    argv = [
        "--workloads",
        "train",
        "--batches",
        "64",
        "--provider",
        "reference",
        "--precision",
        "fp32",
        "--calls",
        "2",
        "--device",
        "cpu",
        "--no-profiler",
    ]
    assert profile_step.main(argv) == 0
    assert "train at 64:" in capsys.readouterr().out
    assert profile_step.main([*argv, "--out", str(tmp_path / "unused")]) == 0
    assert not (tmp_path / "unused").exists()
    with pytest.raises(SystemExit):
        profile_step.main(argv[:-1])  # neither --out nor --no-profiler


def test_commit_says_when_the_tree_differs_from_it(monkeypatch):
    from aunn_fast.bench import environment

    answers = {("rev-parse", "HEAD"): "abc123"}
    monkeypatch.setattr(environment, "_git", lambda *args: answers.get(args[:2], ""))
    monkeypatch.delenv("AUNN_FAST_COMMIT", raising=False)
    assert environment.git_commit() == "abc123"
    answers[("status", "--porcelain")] = " M kernels/common.py"
    assert environment.git_commit() == "abc123+dirty"
    monkeypatch.setenv("AUNN_FAST_COMMIT", "def456")  # given explicitly: it wins over a stale repository
    assert environment.git_commit() == "def456"
    monkeypatch.setattr(environment, "_git", lambda *args: None)
    assert environment.git_commit() == "def456"
    monkeypatch.delenv("AUNN_FAST_COMMIT")
    assert environment.git_commit() is None


def test_compile_check_knows_the_tile_fields() -> None:
    """--tiles takes every Tiles field a candidate can set."""
    pytest.importorskip("triton")
    import dataclasses

    from aunn_fast.bench import compile_check
    from aunn_fast.kernels.config import Tiles

    every = [f.name for f in dataclasses.fields(Tiles) if f.name != "fused"]
    assert compile_check._tile_overrides(",".join(f"{name}=1" for name in every)) == dict.fromkeys(every, 1)


@pytest.mark.skipif(BACKENDS["cpp"].unavailable_reason("cpu") is not None, reason="the cpp extension is not built here")
def test_cpp_train_workload_takes_the_trainers_one_call_step(monkeypatch):
    """On the cpp backend the train workload times what `aunn train` runs, one C++ call per step
    (FusedAdamWStep, tested against torch's AdamW in test_cpp.py), not the eager loss, backward and step."""
    from aunn_fast.bench import workloads

    model = harness.nontrivial_model(TINY, seed=3)
    model.backend = "cpp"
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(model, "loss", lambda *args: pytest.fail("the eager loss ran"))
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *args: pytest.fail("the eager optimizer step ran"))
    step = workloads.WORKLOADS["train"].prepare(model, 64, torch.Generator().manual_seed(7)).step
    for _ in range(3):
        step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
