"""Model configuration: the shape of an AUNN, validated once at construction."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from .errors import UserInputError, UserTypeError

MAX_BITS = 64
SMALLEST_NORMAL_FP32 = 2.0**-126
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class AUNNConfig:
    """Shape of an Absolute Unit Neural Network.

    vocab_size:     number of output classes (tokens), >= 2.
    hidden:         width H of every hidden layer.
    layers:         total layers counting the input layer and the output head (>= 2);
                    there are ``layers - 2`` hidden H->H layers.
    bits:           binary digits of the index fed to the input layer, 1..64.
    eps:            RMSNorm epsilon, at least 2**-126; None means float32 machine epsilon, as
                    ``torch.nn.RMSNorm``.
    residual_every: the running residual is added after every ``residual_every``-th hidden layer.
    """

    vocab_size: int = 4
    hidden: int = 64
    layers: int = 8
    bits: int = 64
    eps: float | None = None
    residual_every: int = 2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden", "layers", "bits", "residual_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserTypeError(f"AUNNConfig.{name} must be an int, got {type(value).__name__}")
        if self.vocab_size < 2:
            raise UserInputError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.hidden < 1:
            raise UserInputError(f"hidden must be >= 1, got {self.hidden}")
        if self.layers < 2:
            raise UserInputError(f"layers must be >= 2 (input layer and output head), got {self.layers}")
        if not 1 <= self.bits <= MAX_BITS:
            raise UserInputError(f"bits must be in 1..{MAX_BITS}, got {self.bits}")
        if self.residual_every < 1:
            raise UserInputError(f"residual_every must be >= 1, got {self.residual_every}")
        if self.eps is not None:
            if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool):
                raise UserTypeError(f"AUNNConfig.eps must be a float or None, got {type(self.eps).__name__}")
            if not (math.isfinite(self.eps) and self.eps >= SMALLEST_NORMAL_FP32):
                raise UserInputError(
                    f"eps must be finite and at least 2**-126 (the smallest normal float32: the GPU's "
                    f"rsqrt flushes smaller values to zero), or None; got {self.eps!r}"
                )

    @property
    def hidden_layers(self) -> int:
        """Number of H->H layers between the input layer and the head."""
        return self.layers - 2

    @property
    def norm_eps(self) -> float:
        """The epsilon actually used by RMSNorm."""
        import torch

        return float(torch.finfo(torch.float32).eps) if self.eps is None else float(self.eps)

    @property
    def max_index(self) -> int:
        """Largest valid index: 2**bits - 1, capped by the int64 range."""
        return min(2**self.bits, 2**63) - 1

    def check_span(self, start: int, length: int) -> None:
        """ValueError unless the indices start .. start+length-1 (start itself when length is 0) are valid
        indices of this model, 0 .. max_index; also for length < 0."""
        if length < 0:
            raise UserInputError(f"length must be >= 0, got {length}")
        last = start + max(length, 1) - 1
        if start < 0 or last > self.max_index:
            raise UserInputError(
                f"indices {start}..{last} go past the model's largest index {self.max_index} (bits={self.bits})"
            )

    def to_json(self) -> str:
        """The config as a JSON object with sorted keys (read back by :meth:`from_json`)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AUNNConfig:
        """The config written by :meth:`to_json`, validated again."""
        fields: dict[str, Any] = json.loads(text)
        return cls(**fields)
