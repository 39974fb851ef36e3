"""The ``aunn`` command line: train, eval, generate, condition, demo, bench."""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import torch

from . import __version__, digits, distributed, runlock
from .atomic import write_file_set
from .backends import BACKENDS, resolve_backend, resolve_precision
from .callbacks import TensorBoardLogger
from .config import PRECISIONS, AUNNConfig
from .data import FINGERPRINT_KEYS, Dataset, DigitsData, HeldOutTail, data_from_description, decode, encode, load_data
from .errors import AUNNError, CheckpointError
from .evaluate import evaluate, summary
from .inference import CONDITION_OPTIMIZERS, condition, generate, generate_by_backprop
from .model import AUNN
from .report import write_report
from .resources import check_fits, check_model_fits
from .schedule import SCHEDULES
from .train import CHECKPOINT_NAME, FULL_PASS_LIMIT, LOG_NAME, TrainConfig, check_data_fits, load_run, read_log, train
from .validation import check_device


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# -- argument types: bad values fail in argparse, with its one-line error, before anything runs ----


def _number(kind: type, low: float, strict: bool = False, high: float = math.inf) -> Callable[[str], Any]:
    """An argparse type: an int (kind=int) or a finite float, at least ``low`` (above it when strict) and at
    most ``high``."""

    def parse(text: str) -> Any:
        value = kind(text)  # a ValueError here is argparse's "invalid int value: 'x'"
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"expected {what} {'>' if strict else '>='} {low:g}, got {text}")
        if value > high:
            raise argparse.ArgumentTypeError(f"expected at most {high}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


COUNT, NON_NEGATIVE_INT = _number(int, 1), _number(int, 0)
SEED = _number(int, 0, high=2**63 - 1)  # what torch.Generator.manual_seed takes
POSITIVE, NON_NEGATIVE = _number(float, 0, strict=True), _number(float, 0)
FRACTION = _number(float, 0, strict=True, high=1.0)  # in (0, 1]
SHARE = _number(float, 0, high=1.0)  # in [0, 1]


def _index(text: str) -> str | int:
    """END, or an index >= 0 (whether it fits the model is checked once the checkpoint is open)."""
    if text.upper() == "END":
        return "END"
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"expected END or an index >= 0, got {text!r}")
    return int(text)


def _device(text: str) -> str:
    """cpu, cuda or cuda:N, a device this machine has (validation.check_device)."""
    try:
        device = check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda (or cuda:N), got {text!r}")
    return text


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", type=_device, default=default_device(), help="cpu, cuda or cuda:N (default: cuda when available)"
    )
    p.add_argument(
        "--backend",
        choices=("auto", *BACKENDS),
        default="auto",
        help=f"{', '.join(('auto', *BACKENDS))} (default auto: triton on CUDA; on the CPU cpp where its extension "
        "builds, else reference)",
    )
    p.add_argument(
        "--precision", choices=("auto", *PRECISIONS), default="auto", help="auto, fp32, tf32 or bf16 (default auto)"
    )


def _add_condition_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=NON_NEGATIVE_INT, default=1, help="gradient steps of conditioning (default 1)")
    p.add_argument("--lr", type=NON_NEGATIVE, default=1e-3, help="learning rate of conditioning (default 1e-3)")
    p.add_argument(
        "--optimizer",
        choices=CONDITION_OPTIMIZERS,
        default="adam",
        help="optimizer of conditioning: a fresh adam (default) or sgd",
    )


ARCHITECTURE = {"hidden": 64, "layers": 8, "bits": 64}  # train's model options and their defaults


def _add_training_options(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()  # the defaults shown are the trainer's own
    # The model options default to None so that --resume can tell them given (they must then match the checkpoint).
    p.add_argument("--hidden", type=int, default=None, help=f"hidden width H (default {ARCHITECTURE['hidden']})")
    p.add_argument(
        "--layers", type=int, default=None, help=f"layers incl. input layer and head (default {ARCHITECTURE['layers']})"
    )
    p.add_argument(
        "--bits", type=int, default=None, help=f"binary digits of the index (default {ARCHITECTURE['bits']})"
    )
    p.add_argument("--batch-size", type=COUNT, default=None, help=f"indices per step (default {d.batch_size})")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=POSITIVE, default=None, help=f"passes over the data (default {d.epochs:g})")
    length.add_argument("--steps", type=NON_NEGATIVE_INT, default=None, help="optimizer steps (overrides epochs)")
    p.add_argument("--lr", type=NON_NEGATIVE, default=None, help=f"AdamW peak learning rate (default {d.lr:g})")
    p.add_argument(
        "--warmup-steps",
        type=NON_NEGATIVE_INT,
        default=None,
        help=f"steps of linear warm-up to --lr (default {d.warmup_steps})",
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=None,
        help=f"decay from --lr after warm-up to --min-lr at the last step (default {d.schedule})",
    )
    p.add_argument(
        "--min-lr", type=NON_NEGATIVE, default=None, help=f"learning rate at the last step (default {d.min_lr:g})"
    )
    p.add_argument(
        "--clip-grad-norm",
        type=NON_NEGATIVE,
        default=None,
        help=f"cut the gradients' total norm to this before every step, 0: never (default {d.clip_grad_norm:g})",
    )
    p.add_argument(
        "--weight-decay", type=NON_NEGATIVE, default=None, help=f"AdamW weight decay (default {d.weight_decay:g})"
    )
    p.add_argument("--seed", type=SEED, default=None, help="seed of the initial weights and batch order (default 0)")
    p.add_argument("--log-every", type=COUNT, default=None, help=f"steps between log rows (default {d.log_every})")
    p.add_argument("--save-every", type=COUNT, default=None, help=f"steps between checkpoints (default {d.save_every})")
    p.add_argument(
        "--eval-every",
        type=NON_NEGATIVE_INT,
        default=None,
        help=f"steps between measurements of the accuracy over the whole training data (above "
        f"{FULL_PASS_LIMIT:,} indices a fixed sample of that many), logged as full_accuracy "
        f"(default {d.eval_every}: never)",
    )
    p.add_argument(
        "--target-accuracy",
        type=FRACTION,
        default=None,
        help="stop once a --eval-every measurement reaches this accuracy (a fraction, e.g. 1.0)",
    )
    p.add_argument(
        "--focus",
        type=SHARE,
        default=None,
        help="after each --eval-every measurement, add this share of a batch to every step from the indices it "
        f"found wrong (default {d.focus:g}: off)",
    )
    p.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_const",
        const=False,
        default=None,
        help="on CUDA, run every step eagerly instead of replaying a captured graph",
    )
    _add_tensorboard_option(p)


def _add_tensorboard_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tensorboard",
        type=Path,
        default=None,
        metavar="DIR",
        help="also log the training figures (and the demo's evaluation) to TensorBoard in DIR "
        "(needs the tensorboard package)",
    )


TRAIN_OPTIONS = (
    "batch_size",
    "epochs",
    "steps",
    "lr",
    "warmup_steps",
    "schedule",
    "min_lr",
    "clip_grad_norm",
    "weight_decay",
    "seed",
    "log_every",
    "save_every",
    "eval_every",
    "target_accuracy",
    "focus",
    "cuda_graph",
)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line (``aunn train: error: ...``) instead of after the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="aunn", description="Absolute Unit Neural Networks, trained and run fast.")
    parser.add_argument("--version", action="version", version=f"aunn_fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model on a dataset")
    p.add_argument("--data", required=False, help="toy[:CHUNKS[:SEED]], text:PATH, bytes:PATH or tokens:PATH")
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoint, log)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--reset-optimizer",
        action="store_true",
        help="with --resume: continue with a fresh AdamW (zero moments) instead of the saved one; "
        "the run then differs from an uninterrupted one",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_training_options(p)
    _add_runtime_options(p)

    p = sub.add_parser("eval", help="write metrics.json, report.md and plots into a run directory")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--trials", type=COUNT, default=30, help="conditioning trials (toy data; default 30)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the sampled evaluations (default 0)")
    _add_condition_options(p)
    _add_runtime_options(p)

    p = sub.add_parser("generate", help="print the model's tokens past the end of the data (or from any index)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--start", type=_index, default="END", help="END (the first index after the data) or an index")
    p.add_argument("--length", type=NON_NEGATIVE_INT, default=200, help="tokens to print (default 200)")
    p.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0 = argmax (default), else softmax sampling")
    p.add_argument(
        "--by-backprop",
        action="store_true",
        help="Gwern's scheme: train on each prediction as data before predicting the next",
    )
    p.add_argument("--seed", type=SEED, default=0, help="sampling seed (default 0)")
    _add_condition_options(p)
    _add_runtime_options(p)

    p = sub.add_parser("condition", help="teach a copy of the model a prompt by backprop, show what follows")
    p.add_argument("run_dir", type=Path)
    p.add_argument(
        "--prompt",
        required=True,
        help="text placed at --at .. --at+len-1 (a tokens:PATH model: token ids separated by spaces)",
    )
    p.add_argument("--at", type=_index, default="END", help="END (the first index after the data) or an index")
    p.add_argument("--show", type=NON_NEGATIVE_INT, default=40, help="tokens shown after the prompt (default 40)")
    p.add_argument("--save", type=Path, default=None, help="write the conditioned model to this new run directory")
    _add_condition_options(p)
    _add_runtime_options(p)

    p = sub.add_parser("demo", help="the seed experiment end to end: train on toy data, evaluate, plot")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="run directory (default ./demo_out)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="cpu: sized for a 2-core CPU (default); seed: the seed notebook's own run (GPU); "
        "tiny: a smoke test; digits: handwritten digits, generated and inpainted (2-core CPU); "
        "shakespeare: memorise a text (--data text:PATH; one GPU)",
    )
    p.add_argument("--data", default=None, help="the preset's data instead of its own (shakespeare needs it)")
    p.add_argument(
        "--hold-out",
        type=NON_NEGATIVE_INT,
        default=0,
        help="tokens at the end of the data kept out of training; metrics.json's held_out scores "
        "the model's predictions there against a unigram model (default 0)",
    )
    p.add_argument("--seed", type=SEED, default=0, help="seed of the initial weights and batch order (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_tensorboard_option(p)
    _add_runtime_options(p)

    sub.add_parser("bench", help="the benchmark suite (same options as bench/run.py)", add_help=False)
    return parser


# -- checks that need more than one option, or a file: all run before any compute ----------------


class CommandError(Exception):
    """Bad input found by a command's own checks: main prints it as one line and exits with status 2."""


def _fail(message: str) -> NoReturn:
    raise CommandError(message)


def _check_backend(args: argparse.Namespace) -> None:
    """The backend asked for must run on the device asked for (argparse has checked both names), and the one
    that will run must accept its settings (e.g. the triton backend's environment switches)."""
    if args.backend != "auto":
        reason = BACKENDS[args.backend].unavailable_reason(torch.device(args.device))
        if reason is not None:
            _fail(f"backend {args.backend!r} is unavailable on {args.device}: {reason}")
    backend = resolve_backend(args.backend, args.device)
    try:  # both check the user's settings only: every ValueError is one
        backend.check_settings()
        resolve_precision(args.precision, torch.device(args.device), backend)
    except ValueError as exc:
        _fail(str(exc))


def _check_run_path(path: Path) -> None:
    """Fail unless ``path`` is a directory, or one that can be made (its nearest existing ancestor a writable
    directory)."""
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        _fail(f"{existing} is a file, not a directory: {path} cannot be a run directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        _fail(f"{existing} is not writable: {path} cannot be a run directory")


@contextlib.contextmanager
def _writing(path: Path | None, command: str) -> Iterator[None]:
    """Hold the lock of run directory ``path`` (if any) for the block, after checking that it can be one. Under
    torchrun rank 0 alone holds it, as it alone writes there."""
    if path is None:
        yield
        return
    _check_run_path(path)
    if distributed.rank_and_world_size()[0] != 0:
        yield
        return
    with runlock.hold(path, command):
        yield


def _refuse_existing_run(path: Path, advice: str) -> None:
    """Fail unless ``path`` can become a new run directory (:func:`_check_run_path`); a checkpoint or a
    training log is never overwritten."""
    _check_run_path(path)
    found = [name for name in (CHECKPOINT_NAME, LOG_NAME) if (path / name).exists()]
    if found == [LOG_NAME]:
        _fail(
            f"{path} holds a training log but no checkpoint (a run that stopped before its first save cannot "
            f"be resumed); pass another --out, or remove {path / LOG_NAME}"
        )
    if found:
        _fail(f"{path} already holds a run ({', '.join(found)}); {advice}")


def _open_run(args: argparse.Namespace, needs_data: bool = False) -> AUNN:
    """The run's model. A checkpoint saved by ``model.save`` outside a run has no data and no vocabulary:
    its tokens are then read and shown as ids, and a command that needs the data (``needs_data``) fails."""
    path = args.run_dir / CHECKPOINT_NAME
    if not path.exists():
        _fail(f"no checkpoint in {args.run_dir} (expected {CHECKPOINT_NAME})")
    model = AUNN.load(path, backend=args.backend, precision=args.precision, map_location=args.device)
    if model.data_description is None:
        if needs_data:
            _fail(f"{path} does not say which data it was trained on (saved by model.save, not aunn train)")
        if model.vocab is None:
            model.vocab = model.cfg.vocab_size
    return model


def _first_index(model: AUNN, value: str | int, length: int) -> int:
    """Index ``value`` (END: the first after the data), checking that ``length`` indices from it fit the model."""
    if value == "END":
        if not model.data_description:
            _fail("the checkpoint does not say which data it was trained on; pass an index, not END")
        value = int(model.data_description["length"])
    model.cfg.check_span(int(value), length)
    return int(value)


def _resume(args: argparse.Namespace) -> tuple[AUNN, Dataset, dict[str, Any], dict[str, Any]]:
    """The model, data, saved training options and training state of the run in --out, refusing anything that
    would not continue it exactly: changed data, or model options that differ from the checkpoint's."""
    model, state, _, _ = load_run(args.out, args.device, args.backend, args.precision, args.reset_optimizer)
    try:
        TrainConfig(**state.get("train_config", {}))
    except (TypeError, ValueError) as exc:  # a field this version does not know, or a value out of range
        raise CheckpointError(args.out / CHECKPOINT_NAME, "train_state.train_config", str(exc)) from None
    new_run = "--resume continues a run exactly; start a new run with another --out"
    try:
        data = data_from_description(model.data_description, model.vocab)
    except (ValueError, FileNotFoundError) as exc:
        _fail(f"cannot reopen the data of this run: {exc}; {new_run}")
    if args.data and load_data(args.data).describe() != data.describe():
        _fail("--data differs from the data of the run being resumed")
    for name in ARCHITECTURE:
        given, kept = getattr(args, name), getattr(model.cfg, name)
        if given is not None and given != kept:
            _fail(f"--{name} {given} differs from the checkpoint's {kept}; a resumed run keeps its model")
    return model, data, state.get("train_config", {}), state


def cmd_train(args: argparse.Namespace) -> int:
    if args.reset_optimizer and not args.resume:
        _fail("--reset-optimizer applies to --resume only")
    with _writing(args.out, "aunn train"):
        return _train_locked(args)


def _train_locked(args: argparse.Namespace) -> int:
    """cmd_train, holding --out's lock: the checks of the directory's contents, then the run."""
    overrides = {name: getattr(args, name) for name in TRAIN_OPTIONS if getattr(args, name) is not None}
    if overrides.get("clip_grad_norm") == 0:  # --clip-grad-norm 0: no clipping
        overrides["clip_grad_norm"] = None
    saved: dict[str, Any] = {}
    state: dict[str, Any] = {}
    if args.resume:
        model, data, saved, state = _resume(args)
        if "epochs" in overrides:
            saved.pop("steps", None)
        train_cfg = TrainConfig(**{**saved, **overrides})
        total = train_cfg.total_steps(data.length)
        check_model_fits(model.cfg, args.device, min(train_cfg.batch_size, data.length))  # --batch-size may be new
    else:
        _refuse_existing_run(args.out, "continue it with --resume, or pass another --out")
        if not args.data:
            _fail("--data is required (toy, text:PATH, bytes:PATH or tokens:PATH)")
        data = load_data(args.data)
        shape = {
            name: default if getattr(args, name) is None else getattr(args, name)
            for name, default in ARCHITECTURE.items()
        }
        cfg = AUNNConfig(vocab_size=data.vocab_size, **shape)
        check_data_fits(data, cfg)
        train_cfg = TrainConfig(**overrides)
        total = train_cfg.total_steps(data.length)
        check_model_fits(cfg, args.device, min(train_cfg.batch_size, data.length))
        model = AUNN(cfg, backend=args.backend, precision=args.precision, seed=train_cfg.seed).to(args.device)
    logger = _tensorboard(args.tensorboard, int(state.get("step", 0)))
    shown = {k: v for k, v in data.describe().items() if k not in FINGERPRINT_KEYS}
    print(
        f"training {model.cfg} on {shown} for {total} steps "
        f"({args.device}, backend {model.active_backend().name}, precision {model.active_precision()}); "
        f"{_recipe(train_cfg)}"
    )
    try:
        rows = train(
            model,
            data,
            train_cfg,
            args.out,
            resume=args.resume,
            progress=not args.quiet,
            reset_optimizer=args.reset_optimizer,
            callbacks=[logger] if logger else [],
        )
    except KeyboardInterrupt:
        if (args.out / CHECKPOINT_NAME).exists():
            print(f"interrupted: resume with `aunn train --out {args.out} --resume`", file=sys.stderr)
        else:
            print("interrupted before the first checkpoint: nothing to resume", file=sys.stderr)
        return 130
    finally:
        if logger:
            logger.close()
    if rows:
        print(f"done: {_last_figures(rows)}; checkpoint {args.out / CHECKPOINT_NAME}")
    return 0


def _recipe(cfg: TrainConfig) -> str:
    """One line of the recipe, e.g. "AdamW lr 0.01 (warm-up 100, cosine to 0), weight decay 0.1, clip 1"."""
    clip = "no clipping" if cfg.clip_grad_norm is None else f"gradient norm clipped to {cfg.clip_grad_norm:g}"
    decay = "" if cfg.schedule == "constant" else f" to {cfg.min_lr:g}"
    focus = f", focus {cfg.focus:g} of the batch on the last full pass's mistakes" if cfg.focus else ""
    return (
        f"AdamW lr {cfg.lr:g} (warm-up {cfg.warmup_steps}, {cfg.schedule}{decay}), "
        f"weight decay {cfg.weight_decay:g}, {clip}{focus}"
    )


def _last_figures(rows: list[dict[str, float]]) -> str:
    """The last logged row's step, loss and batch accuracy, and the last full-pass accuracy if one was measured."""
    last = rows[-1]
    text = f"step {int(last['step'])}, loss {last['loss']:.5f}, batch accuracy {last['accuracy']:.4f}"
    full = [r for r in rows if not math.isnan(r["full_accuracy"])]
    if full:
        text += (
            f", accuracy over {int(full[-1]['full_accuracy_indices']):,} training indices "
            f"{full[-1]['full_accuracy']:.4%} (step {int(full[-1]['step'])})"
        )
    return text


def _tensorboard(log_dir: Path | None, first_step: int = 0) -> TensorBoardLogger | None:
    """A TensorBoardLogger writing to log_dir (a resumed run's events after first_step dropped), or None."""
    if log_dir is None or distributed.rank_and_world_size()[0] != 0:  # under torchrun rank 0 alone logs
        return None
    try:
        return TensorBoardLogger(str(log_dir), purge_step=first_step or None)
    except ImportError as exc:
        _fail(str(exc))


def _evaluate_run(
    model: AUNN, run_dir: Path, trials: int, steps: int, lr: float, optimizer: str, seed: int
) -> dict[str, Any]:
    data = data_from_description(model.data_description, model.vocab)
    log_rows = read_log(run_dir / LOG_NAME)  # read first: a broken log fails before the evaluation's work
    metrics = evaluate(
        model,
        data,
        seed=seed,
        condition_trials=trials,
        condition_steps=steps,
        condition_lr=lr,
        condition_optimizer=optimizer,
    )

    def write(staging: Path) -> list[Path]:
        written: list[Path] = []
        if isinstance(data, DigitsData):  # conditioning there is inpainting
            metrics["digits"] = digits.run(model, data, staging, steps, lr, optimizer)
            written = sorted(staging.iterdir())
        return written + write_report(staging, model, data, metrics, log_rows)

    # written as a set: a failure (a full disk) leaves the directory's previous report as it was
    write_file_set(run_dir, write)
    return metrics


def cmd_eval(args: argparse.Namespace) -> int:
    model = _open_run(args, needs_data=True)
    metrics = _evaluate_run(model, args.run_dir, args.trials, args.steps, args.lr, args.optimizer, args.seed)
    print(summary(metrics))
    print(f"wrote {args.run_dir}/metrics.json, report.md and plots")
    return 0


PRINTED_TOKEN_BYTES = 48  # a token's Python int in a list, its text, the printed string: an estimate


def cmd_generate(args: argparse.Namespace) -> int:
    model = _open_run(args)
    start = _first_index(model, args.start, args.length)
    check_fits(f"printing {args.length:,} tokens", args.length * PRINTED_TOKEN_BYTES, "cpu")
    generator = torch.Generator().manual_seed(args.seed)
    if args.by_backprop:
        tokens = generate_by_backprop(
            model, start, args.length, args.temperature, args.steps, args.lr, args.optimizer, generator
        )
    else:
        tokens = generate(model, start, args.length, args.temperature, generator)
    print(decode(tokens, model.vocab))
    return 0


def cmd_condition(args: argparse.Namespace) -> int:
    with _writing(args.save, "aunn condition --save"):
        return _condition_locked(args)


def _condition_locked(args: argparse.Namespace) -> int:
    """cmd_condition, holding the lock of --save's directory (if given)."""
    if args.save is not None:
        _refuse_existing_run(args.save, "--save writes a new run directory: pass one without a run")
    model = _open_run(args)
    try:
        prompt = torch.tensor(encode(args.prompt, model.vocab), dtype=torch.int64)
    except ValueError as exc:
        _fail(str(exc))
    if prompt.numel() == 0:
        _fail("--prompt is empty: give at least one token")
    at = _first_index(model, args.at, prompt.numel() + args.show)
    after_prompt = at + prompt.numel()
    tuned = condition(model, prompt, at, steps=args.steps, lr=args.lr, optimizer=args.optimizer)
    span = prompt.numel() + args.show
    print(
        f"prompt {args.prompt!r} taught at indices {at}..{after_prompt - 1} "
        f"({args.steps} {args.optimizer} step(s), lr {args.lr})"
    )
    print(f"before: {decode(generate(model, at, span), model.vocab)!r}")
    print(f"after:  {decode(generate(tuned, at, span), model.vocab)!r}")
    if args.save is not None:
        tuned.save(args.save / CHECKPOINT_NAME)
        print(f"conditioned model saved to {args.save / CHECKPOINT_NAME}")
    return 0


@dataclass(frozen=True)
class Preset:
    """A demo run: data spec (None: ``--data`` gives it), model width and depth, training, and conditioning
    (eval's trials on toy data, inpainting on digits)."""

    data: str | None
    hidden: int
    layers: int
    train: TrainConfig
    condition_steps: int = 1
    condition_lr: float = 1e-3
    bits: int = ARCHITECTURE["bits"]  # for the preset's own data; a --data of the user's gets the default


# Every preset trains with TrainConfig's schedule (lr 1e-2 unless said, warm-up, cosine decay to 0; docs/training.md).
# Weight decay above the default 0.01 shrinks the weights of index bits never set in training, which is what
# keeps the toy data's chunk structure valid 10 million indices out; on 80,000 indices (toy:20000) 0.1 kept the
# model from learning at all in 2,500 steps, hence not the default. The cpu preset has 0.2: with 0.1, 2 and 8 of
# two convergence matrices' 20 demos fell short of the validity bars near the data or 10M out (docs/training.md).
PRESETS = {
    "tiny": Preset(
        "toy:100",
        32,
        4,
        TrainConfig(batch_size=128, epochs=150, warmup_steps=20, weight_decay=0.1, log_every=10, save_every=10**9),
    ),
    "cpu": Preset(
        "toy:10000",
        64,
        8,
        TrainConfig(batch_size=2048, epochs=150, weight_decay=0.2, log_every=20, eval_every=500, save_every=10**9),
    ),
    # the seed notebook's run: its model, data, batch and 500 epochs, its lr 1e-3 (H=512), the same schedule
    "seed": Preset(
        "toy:100000",
        512,
        8,
        TrainConfig(
            batch_size=2048,
            epochs=500,
            lr=1e-3,
            warmup_steps=1000,
            weight_decay=0.1,
            log_every=200,
            eval_every=9800,
            save_every=19600,
        ),
    ),
    # digits and shakespeare: measured in docs/experiments.md. digits memorises its 1,700 training images within
    # 3 minutes of 2 CPU cores: the images in a similarity tree (every image bit of an index splits alike images),
    # 17 index bits (all the data and its held-out slots need), lr 1e-2 decaying linearly, and from every full
    # pass (every 2 epochs) a quarter more of each batch from what it got wrong; it stops at 100%.
    "digits": Preset(
        "digits:tree",
        256,
        4,
        TrainConfig(
            batch_size=512,
            epochs=80,
            lr=1e-2,
            schedule="linear",
            weight_decay=0.0,
            warmup_steps=200,
            clip_grad_norm=None,
            eval_every=426,
            focus=0.25,
            target_accuracy=1.0,
            log_every=100,
            save_every=10**9,
        ),
        condition_steps=8,
        condition_lr=1e-3,
        bits=17,
    ),
    "shakespeare": Preset(
        None,
        1024,
        6,
        TrainConfig(
            batch_size=65_536,
            epochs=300,
            lr=1e-3,
            weight_decay=0.1,
            warmup_steps=100,
            clip_grad_norm=None,
            log_every=100,
            save_every=2000,
        ),
    ),
}


DEMO_MARKER = "DEMO"


def cmd_demo(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    train_cfg = replace(preset.train, seed=args.seed)
    spec = args.data or preset.data
    if spec is None:
        _fail(f"--preset {args.preset} needs --data (e.g. text:PATH)")
    data = load_data(spec)
    if args.hold_out:
        data = HeldOutTail(data, args.hold_out)
    bits = ARCHITECTURE["bits"] if args.data else preset.bits
    cfg = AUNNConfig(vocab_size=data.vocab_size, hidden=preset.hidden, layers=preset.layers, bits=bits)
    model = AUNN(cfg, backend=args.backend, precision=args.precision, seed=args.seed).to(args.device)
    marker = args.out / DEMO_MARKER
    if not marker.exists():
        _refuse_existing_run(args.out, "it is not a demo's: pass another --out")
    logger = _tensorboard(args.tensorboard)
    args.out.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"written by `aunn demo --preset {args.preset}`; the next demo here overwrites this run\n")
    print(
        f"demo ({args.preset}, seed {args.seed}): {data.describe()}, {cfg}, "
        f"{train_cfg.total_steps(data.length)} steps of {train_cfg.batch_size} on {args.device} "
        f"(backend {model.active_backend().name}, precision {model.active_precision()}); {_recipe(train_cfg)}"
    )
    try:
        began = time.perf_counter()
        rows = train(model, data, train_cfg, args.out, progress=not args.quiet, callbacks=[logger] if logger else [])
        trained = time.perf_counter()
        steps, lr = preset.condition_steps, preset.condition_lr
        metrics = _evaluate_run(model, args.out, 30, steps=steps, lr=lr, optimizer="adam", seed=0)
        if logger:
            logger.log_metrics(metrics, int(rows[-1]["step"]) if rows else 0)
    finally:
        if logger:
            logger.close()
    print(f"trained in {trained - began:.1f} s, evaluated in {time.perf_counter() - trained:.1f} s")
    print(summary(metrics))
    print(f"generated after the data: {decode(generate(model, data.length, 40), model.vocab)!r}")
    print(f"wrote {args.out}/metrics.json, report.md, plots and the checkpoint")
    return 0


def cmd_bench(bench_args: list[str]) -> int:
    from .bench.run import main as bench_main

    return bench_main(bench_args, prog="aunn bench")


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "condition": cmd_condition,
    "demo": cmd_demo,
}


# OSErrors that are the machine's state, not a bug: a full disk, a read-only file system, no permission
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EMFILE,
    errno.ENFILE,
    errno.ENAMETOOLONG,
}
REPORT = "the aunn_fast issue tracker"


def main(argv: list[str] | None = None) -> int:
    """Run a command. Exit status 0: done; 2: the user's error (bad input, an unusable file, a full disk, too
    little memory), one line on stderr; 1: an internal error (a bug), with its traceback; 130: Ctrl-C."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every later argument, --help included, belongs to the benchmark
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        _check_backend(args)
        with distributed.command_rank(args):  # under torchrun, one rank of a data-parallel run
            return COMMANDS[args.command](args)
    except (CommandError, AUNNError) as exc:
        return _user_error(args.command, exc)
    except OSError as exc:
        if exc.errno in ENVIRONMENT_ERRNOS:
            return _user_error(args.command, exc)
        return _internal_error(args.command)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        return _user_error(
            args.command,
            f"out of memory ({str(exc).splitlines()[0] if str(exc) else 'host'}): "
            "try a smaller --batch-size, model or --length",
        )
    except Exception:
        return _internal_error(args.command)


def _user_error(command: str, error: BaseException | str) -> int:
    print(f"aunn {command}: error: {error}", file=sys.stderr)
    return 2


def _internal_error(command: str) -> int:
    """Print the traceback of the exception being handled and what to do with it."""
    kind, error, _ = sys.exc_info()
    traceback.print_exc()
    print(
        f"aunn {command}: internal error: {kind.__name__ if kind else 'error'}: {error}\n"
        f"This is a bug in aunn_fast {__version__}, not a problem with your input. Please report it to {REPORT} "
        "with the command line and the traceback above.",
        file=sys.stderr,
    )
    return 1
