"""Every operator of the ``cuda`` backend once on small shapes, for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool racecheck python -m aunn_fast.bench.cuda_fused_smoke

No checks of the values (tests/test_cuda_fused.py does those): the shapes cover each kernel mode at H = 16, 32,
64 and 128, a vocabulary over several 64-column chunks, a short last tile and a single row; ``--large`` adds a
batch with more tiles than CTAs (each CTA loops over tiles). Exit status 0 when every call returned.
"""

from __future__ import annotations

import argparse

import torch

from aunn_fast import AUNNConfig
from aunn_fast.params import init_params

SHAPES = (
    # hidden, layers, residual_every, bits, vocab, rows
    (16, 3, 1, 64, 5, 300),
    (64, 8, 2, 64, 4, 70),
    (128, 4, 2, 40, 200, 40),
    (32, 2, 1, 7, 2, 1),
)


def run_shape(hidden: int, layers: int, every: int, bits: int, vocab: int, rows: int) -> None:
    """Each operator once at this shape on the current GPU."""
    from aunn_fast import cuda_backend

    if cuda_backend.unavailable_reason(torch.device("cuda")) is not None:
        raise SystemExit(f"cuda backend unavailable: {cuda_backend.unavailable_reason(torch.device('cuda'))}")
    cfg = AUNNConfig(vocab_size=vocab, hidden=hidden, layers=layers, bits=bits, residual_every=every)
    generator = torch.Generator().manual_seed(hidden + layers + vocab + rows)
    params = [(p + 0.3 * torch.randn(p.shape, generator=generator)).cuda() for p in init_params(cfg, generator)]
    idx = torch.randint(0, 2 ** min(bits, 62), (rows,), generator=generator).cuda()
    targets = torch.randint(0, vocab, (rows,), generator=generator).cuda()
    settings = (cfg.residual_every, cfg.norm_eps)
    ops = torch.ops.aunn_fast
    ops.cuda_logits(idx, *params, *settings)
    ops.cuda_argmax(idx, *params, *settings)
    ops.cuda_loss(idx, targets, *params, *settings, False)
    _, unit = ops.cuda_loss(idx, targets, *params, *settings, True)
    ops.cuda_loss_backward(torch.rand(rows, device="cuda"), list(unit), idx, targets, *params, *settings)
    ops.cuda_logits_backward(torch.randn(rows, vocab, device="cuda"), idx, *params, *settings)
    torch.cuda.synchronize()
    print(f"ok: hidden {hidden}, layers {layers}, every {every}, bits {bits}, vocab {vocab}, rows {rows}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cuda_fused_smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", action="store_true", help="also 60,000 rows at H = 64 (several tiles per CTA)")
    args = parser.parse_args(argv)
    for shape in SHAPES:
        run_shape(*shape)
    if args.large:
        run_shape(64, 4, 2, 64, 70, 60000)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
