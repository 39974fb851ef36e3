"""Backend dispatch: which implementation computes logits, loss and predictions.

Every backend takes flat, validated int64 indices [N] (and int64 targets [N]) plus
the float32 parameters, and returns float32 logits [N, V], the loss (its last argument,
``reduction``: "mean" or "sum", a scalar; "none", [N]), or int64 predictions [N].
``reference`` always exists; ``compile`` is the reference under ``torch.compile``;
``triton`` is the fused kernel path (``aunn_fast.kernels``); ``cpp`` the fused CPU path of the
optional C++ extension (``aunn_fast.cpp_backend``, fp32, and bf16 on CPUs with AVX512-BF16), built on first
use where a compiler exists; ``cuda`` the fused CUDA step of the same extension (``aunn_fast.cuda_backend``, bf16,
H in 16-128, vocab <= 256; built where nvcc and a CUDA build of torch exist; not yet run on a GPU, so ``auto``
never picks it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from . import reference
from .config import PRECISIONS


@dataclass(frozen=True)
class Backend:
    """One implementation: its ops on flat int64 indices, the precisions it offers, and why it may be unusable."""

    name: str
    logits: Callable[..., torch.Tensor]
    loss: Callable[..., torch.Tensor]
    predict: Callable[..., torch.Tensor]
    precisions: tuple[str, ...]
    unavailable_reason: Callable[[torch.device], str | None]
    check_settings: Callable[[], None] = lambda: None  # raises ValueError for a bad setting (e.g. an env switch)
    # why one of ``precisions`` cannot run on this machine (e.g. the CPU lacks its instructions), or None
    precision_unavailable: Callable[[str], str | None] = lambda precision: None


def _always_available(device: torch.device) -> str | None:
    return None


def _compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    compiled: dict[str, Callable[..., torch.Tensor]] = {}

    def run(*args: object, **kwargs: object) -> torch.Tensor:
        if "fn" not in compiled:
            compiled["fn"] = torch.compile(fn, dynamic=False)
        return compiled["fn"](*args, **kwargs)

    return run


def _compile_unavailable(device: torch.device) -> str | None:
    try:
        import torch._dynamo  # noqa: F401
    except Exception as exc:  # pragma: no cover - torch builds without dynamo
        return f"torch.compile is unavailable: {exc}"
    return None


def _import_kernels():  # type: ignore[no-untyped-def]
    """The fused-kernel module, imported on first use (importing triton is slow)."""
    from . import kernels

    return kernels


def _triton_unavailable(device: torch.device) -> str | None:
    try:
        kernels = _import_kernels()
    except ImportError as exc:
        return (
            f"the triton backend needs the `triton` package, which failed to import: {exc} (a CUDA build of "
            "torch brings it on Linux; elsewhere pip install 'aunn_fast[triton]')"
        )
    return kernels.unavailable_reason(device)


def _triton_check_settings() -> None:
    _import_kernels().check_switches()


def _triton_op(op: str) -> Callable[..., torch.Tensor]:
    def run(*args: object, **kwargs: object) -> torch.Tensor:
        return getattr(_import_kernels(), op)(*args, **kwargs)

    return run


def _cpp_module():  # type: ignore[no-untyped-def]
    from . import cpp_backend

    return cpp_backend


def _cpp_unavailable(device: torch.device) -> str | None:
    return _cpp_module().unavailable_reason(device)


def _cpp_check_settings() -> None:
    _cpp_module().check_settings()


def _cpp_precision_unavailable(precision: str) -> str | None:
    return _cpp_module().precision_unavailable_reason(precision)


def _cpp_op(op: str) -> Callable[..., torch.Tensor]:
    def run(*args: object, **kwargs: object) -> torch.Tensor:
        return getattr(_cpp_module(), op)(*args, **kwargs)

    return run


def _cuda_module():  # type: ignore[no-untyped-def]
    from . import cuda_backend

    return cuda_backend


def _cuda_unavailable(device: torch.device) -> str | None:
    return _cuda_module().unavailable_reason(device)


def _cuda_check_settings() -> None:
    _cuda_module().check_settings()


def _cuda_op(op: str) -> Callable[..., torch.Tensor]:
    def run(*args: object, **kwargs: object) -> torch.Tensor:
        return getattr(_cuda_module(), op)(*args, **kwargs)

    return run


BACKENDS: dict[str, Backend] = {
    "reference": Backend(
        "reference", reference.logits, reference.loss, reference.predict, PRECISIONS, _always_available
    ),
    "compile": Backend(
        "compile",
        _compiled(reference.logits),
        _compiled(reference.loss),
        _compiled(reference.predict),
        PRECISIONS,
        _compile_unavailable,
    ),
    "triton": Backend(
        "triton",
        _triton_op("logits"),
        _triton_op("loss"),
        _triton_op("predict"),
        PRECISIONS,
        _triton_unavailable,
        _triton_check_settings,
    ),
    "cpp": Backend(
        "cpp",
        _cpp_op("logits"),
        _cpp_op("loss"),
        _cpp_op("predict"),
        ("fp32", "bf16"),
        _cpp_unavailable,
        _cpp_check_settings,
        _cpp_precision_unavailable,
    ),
    "cuda": Backend(
        "cuda",
        _cuda_op("logits"),
        _cuda_op("loss"),
        _cuda_op("predict"),
        ("bf16",),
        _cuda_unavailable,
        _cuda_check_settings,
    ),
}


def available_backends(device: torch.device | str) -> dict[str, str | None]:
    """Every backend's name mapped to None (usable on device) or the reason it is not."""
    device = torch.device(device)
    return {name: backend.unavailable_reason(device) for name, backend in BACKENDS.items()}


def _check_name(kind: str, name: str, choices: Iterable[str]) -> str:
    """name if it is "auto" or one of choices; TypeError/ValueError naming the kind otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"{kind} must be a str, got {type(name).__name__}")
    if name != "auto" and name not in choices:
        raise ValueError(f"unknown {kind} {name!r}; choose from auto, {', '.join(choices)}")
    return name


def check_backend_name(name: str) -> str:
    """name if it is "auto" or a backend's name (usable here or not); TypeError/ValueError otherwise."""
    return _check_name("backend", name, BACKENDS)


def check_precision_name(name: str) -> str:
    """name if it is "auto" or one of PRECISIONS; TypeError/ValueError otherwise."""
    return _check_name("precision", name, PRECISIONS)


def resolve_backend(name: str, device: torch.device | str, precision: str = "auto") -> Backend:
    """The backend called ``name`` for tensors on ``device``; "auto" picks the fastest usable one that offers
    ``precision`` (triton on CUDA, cpp on the CPU for fp32 and, where the CPU has the instructions, bf16, else
    reference), and the reference while a torch.func transform runs: the fused ops have no functorch rules
    (``grad`` fails on them, ``vmap`` loops)."""
    device = torch.device(device)
    if check_backend_name(name) == "auto":
        transforming = torch._C._functorch.peek_interpreter_stack() is not None
        fast = None if transforming else {"cuda": "triton", "cpu": "cpp"}.get(device.type)
        if (
            fast is not None
            and (precision == "auto" or precision in BACKENDS[fast].precisions)
            and BACKENDS[fast].unavailable_reason(device) is None
            and (precision == "auto" or BACKENDS[fast].precision_unavailable(precision) is None)
        ):
            return BACKENDS[fast]
        return BACKENDS["reference"]
    reason = BACKENDS[name].unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is unavailable on {device}: {reason}")
    return BACKENDS[name]


def resolve_precision(name: str, device: torch.device | str, backend: Backend) -> str:
    """The precision to run; "auto" is bf16 on CUDA (where the backend offers it), else fp32."""
    device = torch.device(device)
    if check_precision_name(name) == "auto":
        return "bf16" if device.type == "cuda" and "bf16" in backend.precisions else "fp32"
    if name not in backend.precisions:
        raise ValueError(f"backend {backend.name!r} does not offer precision {name!r}")
    reason = backend.precision_unavailable(name)
    if reason is not None:
        raise ValueError(f"backend {backend.name!r} cannot run precision {name!r} here: {reason}")
    return name
