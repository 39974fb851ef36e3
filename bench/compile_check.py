"""Compile every Triton kernel for a Hopper GPU (sm_90a) on a machine without one.

    python -m aunn_fast.bench.compile_check [--configs seed,bytes] [--precisions fp32,bf16]
        [--fp32-products tf32x3,ieee] [--tiles block_hc=256,num_warps_head=4] [--defaults-only] [--out FILE]

Triton compiles to a cubin without a driver when it is handed the target; its bundled
``ptxas -v`` then reports what a GPU run would pay: registers per thread, spill stores
and loads, and shared memory. A kernel that fails to compile for Hopper, spills, or asks
for more shared memory than an H100 SM has, shows up here before any device time is spent.
The SASS gives static instruction counts per thread: all instructions; the largest
innermost loop body ("loop instr": in the fused forward one group of residual_every
hidden layers, in the fused backward one hidden layer; x warps / rows per program, it is
what that costs per index in warp-instructions issued); MUFU (special-function unit:
exp2, rcp, tanh, rsqrt...) and MMA (HMMA/HGMMA tensor-core instructions). Each is counted
once per place in the code, so a loop body counts once.
In bf16 every path is compiled with both sigmoid choices (``KernelOptions.sigmoid``); in fp32 with each
product method of ``--fp32-products`` (``KernelOptions.fp32_products``; the default "tf32x3" in rows "fp32",
FMAs in rows "fp32 ieee"). Both trunk weight-gradient candidates (``KernelOptions.weight_grad``) are compiled;
``--defaults-only`` compiles only the default sigmoid and weight gradient, the kernels a GPU run takes (about half
the compile time).
``--tiles`` overrides fields of every ``choose_tiles`` answer (``KernelOptions.tiles``, as
kernel_variants' candidates do), to see a candidate's registers and spills before timing it.
Runs without TRITON_INTERPRET (it re-executes itself with the variable removed).
``--cuda`` compiles the C++ extension's CUDA kernels (csrc/cuda) with nvcc instead (bench/cuda_compile_check.py).
Exit status 0 when everything compiled, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import fields, replace
from pathlib import Path

from aunn_fast.bench.options import names_from
from aunn_fast.config import PRECISIONS
from aunn_fast.kernels.config import FP32_PRODUCT_METHODS, SIGMOID_METHODS, WEIGHT_GRAD_METHODS, KernelOptions, Tiles

HOPPER_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on an H100 (sm_90)
CONFIGS = {  # name: (hidden, layers, vocab), as the benchmark's configurations
    "seed": (64, 8, 4),
    "bytes": (128, 8, 256),
    "bpe": (256, 8, 50_257),
    "notebook": (512, 8, 4),
    "wide": (1024, 4, 4),
    "narrow": (16, 4, 4),
    "vocab": (64, 4, 50_257),  # a fused model with a large head: in bf16 the head reads a bf16 weight copy
}


class _HopperWithoutDriver:
    """The few driver answers Triton's JIT needs to compile (never to launch) for sm_90."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):  # type: ignore[no-untyped-def]
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def _ptxas_report(ptx: str, arch: str) -> dict[str, int]:
    """Registers, spill bytes and shared memory that ptxas reports for one kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # the ptxas Triton itself uses for this architecture
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull], capture_output=True, text=True, check=True
        ).stderr

    def number(pattern: str) -> int:
        match = re.search(pattern, out)
        return int(match.group(1)) if match else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack": number(r"(\d+) bytes stack frame"),
    }


def _sass(cubin: bytes) -> list[tuple[int, str]]:
    """(byte offset, instruction) of every SASS instruction in a cubin, by the cuobjdump Triton ships.
    (Triton's own ``asm["sass"]`` stops after 4096 instructions: its parser expects 4-digit offsets.)"""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    return [(int(offset, 16), instr) for offset, instr in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*;)", text)]


def _sass_counts(cubin: bytes) -> dict[str, int]:
    """Static counts in a kernel's SASS: all instructions, those of its largest innermost loop body
    (see the module docstring), special-function (MUFU) and tensor-core (HMMA/HGMMA) ones."""
    code = _sass(cubin)
    loops = []  # (first, last) byte offsets of each loop: a backward branch closes one
    for offset, instr in code:
        target = re.search(r"\bBRA(?:\.U)?\s+(0x[0-9a-f]+)", instr)
        if target and int(target.group(1), 16) < offset:
            loops.append((int(target.group(1), 16), offset))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    text = "\n".join(instr for _, instr in code)
    return {
        "instructions": len(code),
        "loop": max(((b - a) // 16 + 1 for a, b in innermost), default=0),
        "mufu": len(re.findall(r"\bMUFU\.", text)),
        "mma": len(re.findall(r"\bH(?:G)?MMA\.", text)),
    }


def _compile_all(
    configs: list[str],
    precisions: list[str],
    fp32_products: tuple[str, ...] = FP32_PRODUCT_METHODS[:1],
    tiles: dict[str, int] | None = None,
    defaults_only: bool = False,
) -> list[dict[str, object]]:
    """Run every launcher on CPU tensors with launches replaced by compile-only warmups; tiles: Tiles fields
    replaced in every choose_tiles answer; defaults_only: KernelOptions' own sigmoid and weight gradient only,
    not the candidates."""
    import torch
    from triton.runtime.driver import driver

    driver.set_active(_HopperWithoutDriver())
    from aunn_fast.config import AUNNConfig
    from aunn_fast.kernels import head_backward, mlp_backward, mlp_forward, weights
    from aunn_fast.kernels.common import MODE_ARGMAX, MODE_LOGITS, MODE_LOSS
    from aunn_fast.kernels.config import DeviceTraits, choose_config
    from aunn_fast.params import init_params

    rows: list[dict[str, object]] = []
    context: dict[str, str] = {}
    seen: set[int] = set()

    def compile_only(kernel, grid, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            compiled = kernel.warmup(*args, grid=grid, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is a row of the report
            rows.append({**context, "kernel": kernel.fn.__name__, "error": f"{type(exc).__name__}: {exc}"[:300]})
            return
        if id(compiled) in seen:
            return
        seen.add(id(compiled))
        rows.append(
            {
                **context,
                "kernel": kernel.fn.__name__,
                "num_warps": compiled.metadata.num_warps,
                "shared": compiled.metadata.shared,
                **_ptxas_report(compiled.asm["ptx"], "sm_90a"),
                **_sass_counts(compiled.asm["cubin"]),
            }
        )

    for module in (mlp_forward, mlp_backward, head_backward, weights):
        module.launch = compile_only  # this process only compiles: every launcher's launch is a warmup
    # compiled as for a GPU, with the grids of 4 SMs: then 4,096 rows take the head's unsplit form (as an H100's
    # 132 SMs do from ~17K rows on) and 64 rows split its vocabulary into ranges, so both forms are compiled
    compile_device = DeviceTraits(sms=4, interpreted=False)
    # 4,096 rows, compiled as a large batch runs them (bf16 weight copies, KernelOptions.weight_copy_min_rows);
    # and for a large head 64, whose few row blocks split the vocabulary into ranges
    base = KernelOptions(weight_copy_min_rows=4096, tiles=tuple((tiles or {}).items()))
    sigmoids = (base.sigmoid,) if defaults_only else SIGMOID_METHODS
    weight_grads = (base.weight_grad,) if defaults_only else WEIGHT_GRAD_METHODS
    for name in configs:
        hidden, layers, vocab = CONFIGS[name]
        cfg = AUNNConfig(vocab_size=vocab, hidden=hidden, layers=layers)
        params = init_params(cfg)
        for n in (4096, 64) if vocab >= base.vocab_split_min else (4096,):
            rows_label = "" if n == 4096 else ", few rows"
            idx = torch.randint(0, 2**62, (n,))
            targets = torch.randint(0, vocab, (n,))
            variants = [
                (p, s, f)
                for p in precisions
                for s in (sigmoids if p == "bf16" else ("exact",))
                for f in (fp32_products if p == "fp32" else FP32_PRODUCT_METHODS[:1])
            ]
            for precision, sigmoid, products in variants:
                shown = precision if products == FP32_PRODUCT_METHODS[0] else f"{precision} {products}"
                context.update(config=name, precision=shown, sigmoid=sigmoid)
                for weight_grad in weight_grads:
                    options = replace(base, sigmoid=sigmoid, fp32_products=products, weight_grad=weight_grad)
                    config = choose_config(hidden, cfg.bits, vocab, precision, compile_device, options)
                    if weight_grad == weight_grads[0]:  # the forward does not depend on it
                        for mode, label in ((MODE_LOGITS, "logits"), (MODE_ARGMAX, "argmax"), (MODE_LOSS, "loss")):
                            context["path"] = f"forward {label}{rows_label}"
                            mlp_forward.forward(
                                idx, targets, params, cfg.residual_every, cfg.norm_eps, mode, False, config
                            )
                    context["path"] = f"forward loss, training{rows_label}"
                    out, stats, acts, zs = mlp_forward.forward(
                        idx, targets, params, cfg.residual_every, cfg.norm_eps, MODE_LOSS, True, config
                    )
                    context["path"] = f"backward ({weight_grad}){rows_label}"
                    mlp_backward.backward(
                        idx,
                        targets,
                        torch.ones(n),
                        stats,
                        acts,
                        zs,
                        params,
                        cfg.residual_every,
                        cfg.norm_eps,
                        MODE_LOSS,
                        config,
                    )
    return rows


def _table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| config | precision | sigmoid | path | kernel | warps | registers | spill st/ld bytes | stack "
        "| shared KiB | SASS instr | loop instr | MUFU | MMA | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['config']} | {r['precision']} | {r['sigmoid']} | {r['path']} | {r['kernel']} |"
        if "error" in r:
            lines.append(f"{head} | | | | | | | | | | FAILED: {r['error']} |")
            continue
        verdict = [
            w
            for w, bad in (
                ("spills", r["spill_stores"] or r["spill_loads"]),
                ("shared > H100", r["shared"] > HOPPER_SHARED_LIMIT),
            )
            if bad
        ]
        lines.append(
            f"{head} {r['num_warps']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
            f"{r['stack']} | {r['shared'] / 1024:.0f} | {r['instructions']} | {r['loop']} | "
            f"{r['mufu']} | {r['mma']} | "
            f"{', '.join(verdict) or 'ok'} |"
        )
    return "\n".join(lines)


def _tile_overrides(text: str) -> dict[str, int]:
    """ "block_hc=256,num_warps_head=4" -> {"block_hc": 256, "num_warps_head": 4}, fields of kernels.config.Tiles."""
    names = [f.name for f in fields(Tiles) if f.name != "fused"]
    overrides = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name.strip() not in names or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"{item!r}: expected FIELD=INTEGER with FIELD one of {', '.join(names)}")
        overrides[name.strip()] = int(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else list(argv)
    if "--cuda" in given:  # the C++ extension's CUDA kernels instead: see cuda_compile_check
        from .cuda_compile_check import main as cuda_main

        return cuda_main([a for a in given if a != "--cuda"])
    parser = argparse.ArgumentParser(prog="compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs",
        type=names_from(CONFIGS, "configuration(s)"),
        default="seed,bytes,notebook",
        help=f"comma-separated, from {', '.join(CONFIGS)} (default seed,bytes,notebook)",
    )
    parser.add_argument(
        "--precisions",
        type=names_from(PRECISIONS, "precision(s)"),
        default="fp32,bf16",
        help="comma-separated, from fp32, tf32, bf16 (default fp32,bf16)",
    )
    parser.add_argument(
        "--fp32-products",
        type=names_from(FP32_PRODUCT_METHODS, "fp32 product method(s)"),
        default=FP32_PRODUCT_METHODS[0],
        help="comma-separated, from tf32x3, ieee: how fp32 kernels multiply (default tf32x3)",
    )
    parser.add_argument(
        "--tiles",
        type=_tile_overrides,
        default={},
        help="comma-separated Tiles field=value overrides, e.g. block_hc=256 (default: none)",
    )
    parser.add_argument(
        "--defaults-only",
        action="store_true",
        help="only the default sigmoid and weight gradient, not the candidates (about half the time)",
    )
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's kernels cannot be compiled
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run(
            [sys.executable, "-m", "aunn_fast.bench.compile_check", *(argv or sys.argv[1:])], env=env
        ).returncode
    rows = _compile_all(args.configs, args.precisions, tuple(args.fp32_products), args.tiles, args.defaults_only)
    table = _table(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
