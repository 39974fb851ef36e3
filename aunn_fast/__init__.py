"""aunn_fast: Absolute Unit Neural Networks, trained and run fast."""

from .config import AUNNConfig
from .model import AUNN
from .params import AUNNParams

__all__ = ["AUNN", "AUNNConfig", "AUNNParams"]
__version__ = "0.2.0.dev0"  # the one place the version is written (pyproject.toml reads it)
