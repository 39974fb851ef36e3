"""The AUNN module: parameters, input checks, and dispatch to a backend."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import checkpoint
from .backends import Backend, check_backend_name, check_precision_name, resolve_backend, resolve_precision
from .config import AUNNConfig
from .errors import UserInputError, UserTypeError
from .params import AUNNParams, init_params, param_shapes
from .resources import check_model_fits
from .validation import check_indices, check_targets

if TYPE_CHECKING:  # a type only: the model does not depend on the data module
    from .data import Vocab

REDUCTIONS = ("mean", "sum", "none")


class AUNN(nn.Module):
    """An MLP that predicts the token at an absolute index from the index alone.

    ``backend``: "auto" (triton on CUDA, cpp on the CPU in fp32, where available; else
    reference), "reference", "compile", "triton" or "cpp". ``precision``: "auto" (bf16 on CUDA, fp32 on CPU), "fp32",
    "tf32" or "bf16". Both can be changed later as attributes; an unknown name raises
    ValueError at once, an unavailable backend at the first call. ``validate`` (default
    True) checks index and target ranges before every call; turning it off skips a
    device sync, e.g. inside a captured CUDA graph (torch.compile's tracing and torch.func's transforms,
    such as ``torch.func.vmap(model)``, skip them too).
    Calls run with autocast off: ``precision`` alone sets the matrix products' operands.
    """

    def __init__(
        self,
        cfg: AUNNConfig | None = None,
        backend: str = "auto",
        precision: str = "auto",
        seed: int | None = None,
        **config_kwargs: Any,
    ) -> None:
        super().__init__()
        if cfg is None:
            cfg = AUNNConfig(**config_kwargs)
        elif not isinstance(cfg, AUNNConfig):
            raise UserTypeError(f"cfg must be an AUNNConfig (or None), got {type(cfg).__name__}")
        elif config_kwargs:
            raise UserTypeError("pass either an AUNNConfig or config keyword arguments, not both")
        self.cfg = cfg
        self.backend = backend  # names checked here, before the weights are drawn
        self.precision = precision
        check_model_fits(cfg, "cpu")  # the weights are drawn on the host
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, tensor in init_params(cfg, generator)._asdict().items():
            self.register_parameter(name, nn.Parameter(tensor))
        self.validate = True
        self.vocab: Vocab | None = None
        self.data_description: dict[str, Any] | None = None

    # -- configuration -------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The backend asked for: "auto", "reference", "compile", "triton" or "cpp"; checked on assignment."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = check_backend_name(name)

    @property
    def precision(self) -> str:
        """The precision asked for: "auto", "fp32", "tf32" or "bf16"; checked on assignment."""
        return self._precision

    @precision.setter
    def precision(self, name: str) -> None:
        self._precision = check_precision_name(name)

    @property
    def device(self) -> torch.device:
        """The device every parameter (and every input) is on."""
        return self.in_weight.device

    @property
    def params(self) -> AUNNParams:
        """The float32 parameters as live views, in the stacked layout of :mod:`aunn_fast.params`."""
        return AUNNParams(*(getattr(self, name) for name in AUNNParams._fields))

    def active_backend(self) -> Backend:
        """The backend a call runs now ("auto" resolved); RuntimeError if it is unavailable on this device."""
        return resolve_backend(self.backend, self.device, self.precision)

    def active_precision(self) -> str:
        """The precision a call runs now: "fp32", "tf32" or "bf16" ("auto" resolved for this device)."""
        return self._plan()[1]

    def _plan(self) -> tuple[Backend, str]:
        """The backend and the precision a call runs now, each resolved once."""
        backend = self.active_backend()
        return backend, resolve_precision(self.precision, self.device, backend)

    def extra_repr(self) -> str:
        return f"{self.cfg}, backend={self.backend!r}, precision={self.precision!r}"

    # -- compute ---------------------------------------------------------------------
    def _own_precision(self) -> contextlib.AbstractContextManager[None]:
        """Autocast off on the model's device: ``precision`` alone picks the products' operands, and
        every backend computes the same math however the caller has set autocast."""
        if self.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(self.device.type):
            return torch.autocast(self.device.type, enabled=False)
        return contextlib.nullcontext()  # a tenth of the cost of entering autocast(enabled=False)

    def _indices(self, idx: torch.Tensor) -> torch.Tensor:
        idx = check_indices(idx, self.cfg, check_range=self.validate)
        if idx.device != self.device:
            raise UserInputError(f"indices are on {idx.device} but the model is on {self.device}")
        return idx

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """int64 indices [...] -> float32 logits [..., vocab]."""
        idx = self._indices(idx)
        backend, precision = self._plan()
        with self._own_precision():
            flat = backend.logits(idx.reshape(-1).contiguous(), self.params, self.cfg, precision)
        return flat.reshape(*idx.shape, self.cfg.vocab_size)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of int targets at int64 indices (same shape [...]), float32: ``reduction``
        "mean" (default) or "sum", scalars, or "none", each index's loss [...]."""
        if reduction not in REDUCTIONS:
            raise UserInputError(f"unknown reduction {reduction!r}; choose from {', '.join(REDUCTIONS)}")
        idx = self._indices(idx)
        targets = check_targets(targets, idx, self.cfg, check_range=self.validate)
        if idx.numel() == 0:  # zero, still connected to the parameters so that backward() works
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return zero.expand(idx.shape) if reduction == "none" else zero
        backend, precision = self._plan()
        with self._own_precision():
            losses = backend.loss(
                idx.reshape(-1).contiguous(),
                targets.reshape(-1).contiguous(),
                self.params,
                self.cfg,
                precision,
                reduction,
            )
        return losses.reshape(idx.shape) if reduction == "none" else losses

    @torch.no_grad()
    def predict(self, idx: torch.Tensor) -> torch.Tensor:
        """int64 indices [...] -> int64 argmax tokens [...]."""
        idx = self._indices(idx)
        backend, precision = self._plan()
        with self._own_precision():
            flat = backend.predict(idx.reshape(-1).contiguous(), self.params, self.cfg, precision)
        return flat.reshape(idx.shape)

    # -- persistence -------------------------------------------------------------------
    def save(
        self,
        path: str | os.PathLike[str],
        extra: dict[str, torch.Tensor] | None = None,
        extra_metadata: dict[str, str] | None = None,
    ) -> None:
        """Write parameters, config, vocabulary and data description to a safetensors file, atomically."""
        checkpoint.save(path, self.params._asdict(), self.cfg, self.vocab, self.data_description, extra, extra_metadata)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        backend: str = "auto",
        precision: str = "auto",
        map_location: str | torch.device = "cpu",
    ) -> AUNN:
        """Read a file written by :meth:`save`, validated whole first (:func:`checkpoint.load`): a
        ``CheckpointError`` (a ValueError) names the file and the field for a truncated, foreign or
        inconsistent file, FileNotFoundError says there is none."""
        return cls.from_checkpoint(checkpoint.load(path, map_location), backend, precision)

    @classmethod
    def from_checkpoint(cls, ckpt: checkpoint.Checkpoint, backend: str = "auto", precision: str = "auto") -> AUNN:
        """The model of a checkpoint already read by :func:`checkpoint.load`, on its tensors' device."""
        model = cls(ckpt.cfg, backend=backend, precision=precision).to(ckpt.params["in_weight"].device)
        model.load_params(ckpt.params)
        model.vocab, model.data_description = ckpt.vocab, ckpt.data_description
        return model

    @classmethod
    def from_seed_state_dict(cls, state_dict: dict[str, torch.Tensor], **kwargs: Any) -> AUNN:
        """Build from the seed notebook's state dict; the config is inferred from its shapes (``eps`` and
        ``residual_every`` in kwargs go to the config, the rest to the constructor). Entries must be finite
        floating-point tensors: a ValueError/TypeError names the first that is not."""
        config_fields = {f: kwargs.pop(f) for f in ("eps", "residual_every") if f in kwargs}
        cfg, params = checkpoint.params_from_seed_state_dict(state_dict, **config_fields)
        model = cls(cfg, **kwargs)
        model.load_params(params)
        return model

    def to_seed_state_dict(self) -> dict[str, torch.Tensor]:
        """The seed notebook's state-dict layout (inverse of :meth:`from_seed_state_dict`), as detached copies."""
        return checkpoint.seed_state_dict(self.params._asdict(), self.cfg.hidden_layers)

    def load_params(self, params: dict[str, torch.Tensor]) -> None:
        """Copy tensors named as in :class:`AUNNParams` into this model, checking every shape."""
        expected = param_shapes(self.cfg)
        missing = set(expected) - set(params)
        if missing:
            raise UserInputError(f"missing parameters: {', '.join(sorted(missing))}")
        with torch.no_grad():
            for name, shape in expected.items():
                tensor = params[name]
                if tuple(tensor.shape) != shape:
                    raise UserInputError(f"parameter {name} has shape {tuple(tensor.shape)}, expected {shape}")
                getattr(self, name).copy_(tensor)
