"""Safetensors checkpoints (never pickles) and the seed notebook's state-dict layout.

A checkpoint holds the parameters under their :class:`AUNNParams` names, any extra
tensors (optimizer state, under an ``extra.`` prefix) and string metadata: the
format tag, the config as JSON, the vocabulary and the data description.
"""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from .config import AUNNConfig
from .params import param_shapes
from .validation import check_device

if TYPE_CHECKING:
    from .model import AUNN

FORMAT = "aunn_fast/1"
EXTRA_PREFIX = "extra."


def atomic_write(path: str | os.PathLike[str], write: Any) -> None:
    """Call write(tmp_path), which creates that file, then rename it over path, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkstemp, whose file is mode 0600: write creates tmp with the usual 0666 & ~umask
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        write(tmp)
        _fsync(tmp)  # the data on disk before the rename, so a crash leaves the old file or the new, whole
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: Path) -> None:
    """Flush a file's writes to the disk; for a directory (its entries, the rename) only where the OS can."""
    if not path.is_dir():
        fd = os.open(path, os.O_RDONLY)
    elif hasattr(os, "O_DIRECTORY"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
    else:  # Windows opens no directories
        return
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some file systems refuse to sync a directory; the file itself must be synced
            raise
    finally:
        os.close(fd)


def save(path: str | os.PathLike[str], model: "AUNN", extra: dict[str, torch.Tensor] | None = None,
         extra_metadata: dict[str, str] | None = None) -> None:
    """Write the model's float32 parameters, ``extra`` tensors and metadata to a safetensors file, atomically."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.params._asdict().items()}
    for name, t in (extra or {}).items():
        tensors[EXTRA_PREFIX + name] = t.detach().to("cpu").contiguous()
    metadata = {
        "format": FORMAT,
        "config": model.cfg.to_json(),
        "vocab": json.dumps(model.vocab),
        "data": json.dumps(model.data_description),
        **(extra_metadata or {}),
    }
    # serialized here and written by Python, as safetensors' save_file makes its files mode 0600
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(safetensors.torch.save(tensors, metadata=metadata)))


def read(path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
         ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on map_location) and the metadata of an aunn_fast checkpoint.

    ValueError if map_location is not a usable device, or if the file is not an
    aunn_fast checkpoint; FileNotFoundError if there is no file.
    """
    device = check_device(map_location)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:  # read on the CPU, so that only the file's own problems land here
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{path} is a safetensors file but not an aunn_fast checkpoint "
                                 f"(format tag {metadata.get('format')!r}, expected {FORMAT!r})")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable checkpoint (truncated, or not safetensors): {exc}") from exc
    return {name: t.to(device) for name, t in tensors.items()}, metadata


def load_model(cls: type["AUNN"], path: str | os.PathLike[str], backend: str, precision: str,
               map_location: str | torch.device) -> "AUNN":
    """The model saved at path by :func:`save`, built as ``cls`` on map_location (see :func:`read`)."""
    tensors, metadata = read(path, map_location)
    try:
        cfg = AUNNConfig.from_json(metadata["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} has no valid config: {exc}") from exc
    model = cls(cfg, backend=backend, precision=precision).to(map_location)
    model.load_params(tensors)
    model.vocab = json.loads(metadata.get("vocab", "null"))
    model.data_description = json.loads(metadata.get("data", "null"))
    return model


def extra_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors saved through ``extra``, with their prefix removed."""
    return {name[len(EXTRA_PREFIX):]: t for name, t in tensors.items() if name.startswith(EXTRA_PREFIX)}


# -- the seed notebook's layout: nn.Sequential(Linear, SiLU, RMSNorm) per layer ---------------

SEED_KEYS = {  # AUNNParams name -> seed state-dict key
    "in_weight": "input_layer.0.weight", "in_bias": "input_layer.0.bias", "in_gain": "input_layer.2.weight",
    "out_weight": "output_layer.weight", "out_bias": "output_layer.bias",
}
SEED_LAYER_KEYS = {"hidden_weight": "0.weight", "hidden_bias": "0.bias", "hidden_gain": "2.weight"}  # layers.{i}.*


def _seed_tensor(state_dict: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...] | None = None
                 ) -> torch.Tensor:
    """state_dict[key], checked to be a tensor (of the given shape); ValueError/TypeError naming the key."""
    if key not in state_dict:
        raise ValueError(f"not a seed AUNN state dict: missing {key!r}")
    tensor = state_dict[key]
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"seed state dict entry {key!r} must be a torch.Tensor, got {type(tensor).__name__}")
    if shape is not None and tuple(tensor.shape) != shape:
        raise ValueError(f"seed state dict entry {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def from_seed_state_dict(cls: type["AUNN"], state_dict: Mapping[str, torch.Tensor], **kwargs: Any) -> "AUNN":
    """Build ``cls`` from the seed notebook's state dict, inferring the config from its shapes.

    input_layer.0.weight [H, bits] gives H and bits, output_layer.weight [V, H] the vocabulary,
    the number of ``layers.{i}`` entries the hidden layers. ``eps`` and ``residual_every`` in
    kwargs go to the config, the rest to ``cls``. ValueError names any missing or misshapen entry.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    in_weight = _seed_tensor(state_dict, SEED_KEYS["in_weight"])
    out_weight = _seed_tensor(state_dict, SEED_KEYS["out_weight"])
    if in_weight.dim() != 2 or out_weight.dim() != 2:
        raise ValueError(f"seed state dict entries {SEED_KEYS['in_weight']!r} and {SEED_KEYS['out_weight']!r} "
                         f"must be 2-D, got shapes {tuple(in_weight.shape)} and {tuple(out_weight.shape)}")
    (hidden, bits), vocab = in_weight.shape, out_weight.shape[0]
    n_hidden = len({key.split(".")[1] for key in state_dict if key.startswith("layers.")})
    config_fields = {f: kwargs.pop(f) for f in ("eps", "residual_every") if f in kwargs}
    cfg = AUNNConfig(vocab_size=vocab, hidden=hidden, layers=n_hidden + 2, bits=bits, **config_fields)
    shapes = param_shapes(cfg)
    params = {name: _seed_tensor(state_dict, key, shapes[name]) for name, key in SEED_KEYS.items()}
    for name, suffix in SEED_LAYER_KEYS.items():
        layers = [_seed_tensor(state_dict, f"layers.{i}.{suffix}", shapes[name][1:]) for i in range(n_hidden)]
        params[name] = torch.stack(layers) if layers else torch.empty(shapes[name])
    model = cls(cfg, **kwargs)
    model.load_params(params)
    return model


def to_seed_state_dict(model: "AUNN") -> dict[str, torch.Tensor]:
    """The model's parameters as detached copies under the seed notebook's keys (see :func:`from_seed_state_dict`)."""
    p = model.params._asdict()
    sd = {key: p[name] for name, key in SEED_KEYS.items()}
    for i in range(model.cfg.hidden_layers):
        sd.update({f"layers.{i}.{suffix}": p[name][i] for name, suffix in SEED_LAYER_KEYS.items()})
    return {k: v.detach().clone() for k, v in sd.items()}
