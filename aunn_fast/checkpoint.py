"""Safetensors checkpoints (never pickles), validated as a whole before anything is allocated from them.

A checkpoint holds the parameters under their :class:`AUNNParams` names, any extra tensors (the
optimizer state, under an ``extra.`` prefix) and string metadata: the format tag, the config as
JSON, the vocabulary, the data description and, for a training run, its state and optimizer groups.

:func:`load` reads the file's header first (tensor names, dtypes, shapes, byte ranges) and checks it
and the metadata against the schema below and the config; only then are tensors read, and they must
be finite. Every refusal is a :class:`CheckpointError` naming the file and the field. This module
knows nothing of the model class: :meth:`AUNN.load` builds a model from the :class:`Checkpoint`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from .atomic import atomic_write
from .config import AUNNConfig
from .data import DIGIT_PIXELS, DigitsData, ToyData
from .errors import CheckpointError, MissingFileError, UserInputError, UserTypeError
from .params import param_shapes
from .resources import check_fits
from .validation import check_device

FORMAT = "aunn_fast/1"
EXTRA_PREFIX = "extra."
OPTIMIZER_PREFIX = "optim."  # an optimizer state tensor: extra.optim.{parameter number}.{name}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
}
# Per-parameter optimizer state is saved as optim.{parameter number}.{key}: "step" a scalar, any other key
# (AdamW's exp_avg and exp_avg_sq, SGD's momentum_buffer, ... of a caller's optimizer) a tensor of the
# parameter's shape; every parameter with state has the same keys.
OPTIMIZER_KEY_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")
DATA_KINDS = ("toy", "text", "bytes", "tokens", "digits", "held_out_tail")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the file's header describes it: safetensors dtype name, shape, bytes in the data area."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class Checkpoint:
    """A validated checkpoint: everything in it, checked against the config and the schema.

    params: float32 tensors named and shaped as :func:`param_shapes` says, on the device asked for.
    extra: the ``extra`` tensors, prefix removed (the optimizer state: ``optim.{i}.step|exp_avg|exp_avg_sq``).
    train_state: {"step": int >= 0, "elapsed_s": float >= 0, "train_config": dict} of a training run, or None.
    optimizer_groups: the optimizer's param groups of a training run (JSON list), or None.
    """

    path: Path
    cfg: AUNNConfig
    params: dict[str, torch.Tensor]
    vocab: list[str] | int | None = None
    data_description: dict[str, Any] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    train_state: dict[str, Any] | None = None
    optimizer_groups: list[dict[str, Any]] | None = None

    @property
    def has_optimizer_state(self) -> bool:
        """Whether the optimizer's moments were saved (a run saved before its first step has none)."""
        return any(name.startswith(OPTIMIZER_PREFIX) for name in self.extra)


# -- writing ----------------------------------------------------------------------------------------


def save(
    path: str | os.PathLike[str],
    params: Mapping[str, torch.Tensor],
    cfg: AUNNConfig,
    vocab: list[str] | int | None = None,
    data_description: dict[str, Any] | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> None:
    """Write float32 parameters, ``extra`` tensors and the metadata to a safetensors file, atomically."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in params.items()}
    for name, t in (extra or {}).items():
        tensors[EXTRA_PREFIX + name] = t.detach().to("cpu").contiguous()
    metadata = {
        "format": FORMAT,
        "config": cfg.to_json(),
        "vocab": json.dumps(vocab),
        "data": json.dumps(data_description),
        **(extra_metadata or {}),
    }
    # serialized here and written by Python, as safetensors' save_file makes its files mode 0600
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(safetensors.torch.save(tensors, metadata=metadata)))


# -- reading ----------------------------------------------------------------------------------------


def load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Checkpoint:
    """The validated contents of the checkpoint at path, its tensors on map_location.

    Raises MissingFileError (a FileNotFoundError) if there is no file, UserInputError if map_location
    is unusable, and CheckpointError (a ValueError) naming the field for anything wrong with the file:
    not safetensors, truncated, foreign, a config or metadata that breaks the schema, a tensor of the
    wrong dtype or shape, non-finite values. Nothing is allocated from the file before its header and
    metadata have passed.
    """
    device = check_device(map_location)
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no checkpoint at {path}")
    infos, metadata = read_header(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            path,
            "format",
            f"a safetensors file but not an aunn_fast checkpoint (format tag "
            f"{metadata.get('format')!r}, expected {FORMAT!r})",
        )
    cfg = _config(path, metadata)
    vocab = _vocab(path, metadata, cfg)
    data = _data_description(path, metadata, cfg, vocab)
    train_state, groups = _train_state(path, metadata), _optimizer_groups(path, metadata, cfg)
    _check_tensor_infos(path, infos, cfg)
    check_fits(f"reading {path}", sum(info.end - info.begin for info in infos.values()), "cpu")
    tensors = _read_tensors(path, infos)
    params = {name: tensors[name].to(device) for name in param_shapes(cfg)}
    extra = {name[len(EXTRA_PREFIX) :]: t.to(device) for name, t in tensors.items() if name.startswith(EXTRA_PREFIX)}
    return Checkpoint(path, cfg, params, vocab, data, extra, metadata, train_state, groups)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Every tensor's dtype, shape and byte range, and the metadata, from the file's header alone.

    A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the data.
    CheckpointError for a file that is not safetensors, is truncated, or describes tensors it does not hold.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(path, "", f"not a readable checkpoint (truncated, or not safetensors): {size} bytes")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(
                path,
                "",
                f"not a readable checkpoint (truncated, or not safetensors): its header "
                f"claims {length} bytes, the file holds {size}",
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(path, "", f"not a readable checkpoint (truncated, or not safetensors): {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "", "not a readable checkpoint: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(path, "__metadata__", "must map names to strings")
    data_bytes = size - 8 - length
    infos = {name: _tensor_info(path, name, entry, data_bytes) for name, entry in header.items()}
    covered = 0
    for info in sorted(infos.values(), key=lambda i: i.begin):
        if info.begin != covered:
            raise CheckpointError(path, "", "not a readable checkpoint: its tensors' byte ranges overlap or leave gaps")
        covered = info.end
    if covered != data_bytes:
        raise CheckpointError(
            path,
            "",
            f"not a readable checkpoint (truncated?): its tensors hold {covered} bytes, "
            f"the file {data_bytes} after the header",
        )
    return infos, metadata


def _tensor_info(path: Path, name: str, entry: Any, data_bytes: int) -> TensorInfo:
    where = f"tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(path, where, "its header entry must hold exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise CheckpointError(path, where, f"unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
        raise CheckpointError(path, where, f"shape must be a list of sizes >= 0, got {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
        raise CheckpointError(
            path,
            where,
            f"data_offsets {offsets!r} do not lie within the file's {data_bytes} bytes of data (truncated?)",
        )
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise CheckpointError(
            path, where, f"shape {shape} of {dtype} does not match its {offsets[1] - offsets[0]} bytes"
        )
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _read_tensors(path: Path, infos: Mapping[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """The tensors' data, read on the CPU once the header has passed; the parameters and the optimizer
    state must be finite."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name) for name in infos}
    except SafetensorError as exc:
        raise CheckpointError(path, "", f"not a readable checkpoint (truncated, or not safetensors): {exc}") from None
    for name, tensor in tensors.items():
        if _checked_tensor(name) and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                path,
                f"tensor {name!r}",
                "holds non-finite values (NaN or infinity): the run that wrote it had diverged",
            )
        if name.endswith(".exp_avg_sq") and bool((tensor < 0).any()):
            raise CheckpointError(path, f"tensor {name!r}", "a second moment must be >= 0")
    return tensors


def _checked_tensor(name: str) -> bool:
    return not name.startswith(EXTRA_PREFIX) or name.startswith(EXTRA_PREFIX + OPTIMIZER_PREFIX)


def _check_tensor_infos(path: Path, infos: Mapping[str, TensorInfo], cfg: AUNNConfig) -> None:
    """Every parameter present as float32 of the config's shape; each parameter's optimizer state whole and of
    its shape; nothing else outside ``extra.``."""
    shapes = param_shapes(cfg)
    for name, shape in shapes.items():
        if name not in infos:
            raise CheckpointError(path, f"tensor {name!r}", "missing")
        _expect(path, name, infos[name], shape, ("F32",))
    unknown = sorted(name for name in infos if name not in shapes and not name.startswith(EXTRA_PREFIX))
    if unknown:
        raise CheckpointError(path, f"tensor {unknown[0]!r}", "not a parameter of an AUNN (nor under 'extra.')")
    order = list(shapes)
    found: dict[int, set[str]] = {}
    for name, info in infos.items():
        if not name.startswith(EXTRA_PREFIX + OPTIMIZER_PREFIX):
            continue
        number, _, key = name[len(EXTRA_PREFIX + OPTIMIZER_PREFIX) :].partition(".")
        if not (
            number.isascii()
            and number.isdigit()
            and int(number) < len(order)
            and key
            and set(key) <= OPTIMIZER_KEY_CHARS
        ):
            expected = f"optim.{{0..{len(order) - 1}}}.KEY (KEY: step, exp_avg, exp_avg_sq, ...)"
            raise CheckpointError(path, f"tensor {name!r}", f"not optimizer state: expected {expected}")
        found.setdefault(int(number), set()).add(key)
        if key == "step":
            _expect(path, name, info, (), ("F32", "F64"))
        else:
            _expect(path, name, info, shapes[order[int(number)]], ("F32",))
    # a parameter that never had a gradient (no hidden layers) has no state; every other has the same keys
    every_key = set().union(*found.values()) if found else set()
    for number, keys in found.items():
        missing = every_key - keys
        if missing:
            raise CheckpointError(
                path,
                f"tensor 'extra.optim.{number}.{sorted(missing)[0]}'",
                "missing: the optimizer state is incomplete",
            )


def _expect(path: Path, name: str, info: TensorInfo, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
    if info.dtype not in dtypes:
        raise CheckpointError(path, f"tensor {name!r}", f"dtype {info.dtype}, expected {' or '.join(dtypes)}")
    if info.shape != tuple(shape):
        raise CheckpointError(
            path, f"tensor {name!r}", f"shape {info.shape}, expected {tuple(shape)} (from the checkpoint's config)"
        )


# -- the metadata's schema --------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_field(path: Path, metadata: Mapping[str, str], key: str, required: bool = True) -> Any:
    if key not in metadata:
        if required:
            raise CheckpointError(path, key, "missing from the metadata")
        return None
    try:
        return json.loads(metadata[key])
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(path, key, f"not valid JSON: {exc}") from None


REQUIRED_CONFIG_FIELDS = ("vocab_size", "hidden", "layers", "bits")


def _config(path: Path, metadata: Mapping[str, str]) -> AUNNConfig:
    values = _json_field(path, metadata, "config")
    if not isinstance(values, dict):
        raise CheckpointError(path, "config", f"must be a JSON object, got {type(values).__name__}")
    known = {f.name for f in fields(AUNNConfig)}
    for name in values:
        if name not in known:
            raise CheckpointError(path, f"config.{name}", "not a field of AUNNConfig")
    for name in REQUIRED_CONFIG_FIELDS:
        if name not in values:
            raise CheckpointError(path, f"config.{name}", "missing")
    try:
        return AUNNConfig(**values)
    except (ValueError, TypeError) as exc:  # AUNNConfig checks values only
        raise CheckpointError(path, "config", str(exc)) from None


def _vocab(path: Path, metadata: Mapping[str, str], cfg: AUNNConfig) -> list[str] | int | None:
    vocab = _json_field(path, metadata, "vocab", required=False)
    size = cfg.vocab_size
    if vocab is None:
        return None
    if _is_int(vocab):
        if vocab != size:
            raise CheckpointError(path, "vocab", f"{vocab} token ids, but config.vocab_size is {size}")
        return vocab
    if not (isinstance(vocab, list) and all(isinstance(t, str) and len(t) == 1 for t in vocab)):
        raise CheckpointError(path, "vocab", "must be null, the number of token ids, or a list of single characters")
    if len(vocab) != size or len(set(vocab)) != size:
        raise CheckpointError(
            path,
            "vocab",
            f"must list {size} distinct characters (config.vocab_size), got {len(vocab)} ({len(set(vocab))} distinct)",
        )
    return vocab


def _data_description(path: Path, metadata: Mapping[str, str], cfg: AUNNConfig, vocab: Any) -> dict[str, Any] | None:
    data = _json_field(path, metadata, "data", required=False)
    return None if data is None else _check_description(path, data, cfg, vocab, "data")


def _check_description(path: Path, data: Any, cfg: AUNNConfig, vocab: Any, where: str) -> dict[str, Any]:
    """``data`` (the description at ``where``, e.g. "data" or "data.data" inside a held-out tail's) checked
    against the schema of its kind, the config and the vocabulary."""
    if not isinstance(data, dict):
        raise CheckpointError(path, where, "must be a JSON object describing the data, or null")
    kind = data.get("kind")
    if kind not in DATA_KINDS:
        raise CheckpointError(path, f"{where}.kind", f"must be one of {', '.join(DATA_KINDS)}, got {kind!r}")

    def need(name: str, valid: Any, what: str, required: bool = True) -> None:
        if name not in data:
            if required:
                raise CheckpointError(path, f"{where}.{name}", f"missing (a {kind} dataset's description holds it)")
        elif not valid(data[name]):
            raise CheckpointError(path, f"{where}.{name}", f"must be {what}, got {data[name]!r}")

    need(
        "length",
        lambda v: _is_int(v) and 1 <= v <= cfg.max_index + 1,
        f"an integer in 1..{cfg.max_index + 1} (the indices of bits={cfg.bits})",
    )
    if kind == "held_out_tail":
        need("held_out", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        need("data", lambda v: True, "the whole data's description")
        whole = _check_description(path, data["data"], cfg, vocab, f"{where}.data")
        if whole["length"] != data["length"] + data["held_out"]:
            raise CheckpointError(
                path,
                f"{where}.length",
                f"must be {where}.data.length - {where}.held_out ({whole['length']} - {data['held_out']})",
            )
        return data
    if kind == "digits":
        need("held_out", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
        need("length", lambda v: v % DIGIT_PIXELS == 0, f"a whole number of {DIGIT_PIXELS}-pixel images")
        if vocab != DigitsData.vocab:
            raise CheckpointError(path, "vocab", f"digits data's vocabulary is {DigitsData.vocab}, got {vocab!r}")
        return data
    if kind == "toy":
        need("chunks", lambda v: _is_int(v) and 4 * v == data["length"], "an integer, a quarter of data.length")
        need("seed", lambda v: _is_int(v) and 0 <= v <= MAX_SEED, f"an integer in 0..{MAX_SEED}")
        if vocab != ToyData.vocab:
            raise CheckpointError(path, "vocab", f"toy data's vocabulary is {ToyData.vocab}, got {vocab!r}")
        return data
    need("path", lambda v: isinstance(v, str) and v != "" and "\0" not in v, "a file's path")
    need(
        "sha256",
        lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
        "64 hexadecimal digits",
        required=False,
    )
    need("size", lambda v: _is_int(v) and v >= 0, "a byte count >= 0", required=False)
    need("mtime_ns", _is_int, "an integer", required=False)
    if kind == "tokens":
        need("vocab_size", lambda v: v == cfg.vocab_size, f"config.vocab_size ({cfg.vocab_size})")
    elif kind == "bytes" and (cfg.vocab_size != 256 or vocab is not None):
        raise CheckpointError(path, "vocab", "bytes data has 256 tokens and no vocabulary list")
    elif kind == "text" and not isinstance(vocab, list):
        raise CheckpointError(path, "vocab", "text data needs its list of characters")
    return data


def _train_state(path: Path, metadata: Mapping[str, str]) -> dict[str, Any] | None:
    state = _json_field(path, metadata, "train_state", required=False)
    if state is None:
        return None
    if not isinstance(state, dict):
        raise CheckpointError(path, "train_state", "must be a JSON object")
    if not (_is_int(state.get("step")) and state["step"] >= 0):
        raise CheckpointError(path, "train_state.step", f"must be an integer >= 0, got {state.get('step')!r}")
    if not (_is_number(state.get("elapsed_s", 0.0)) and state.get("elapsed_s", 0.0) >= 0):
        raise CheckpointError(
            path, "train_state.elapsed_s", f"must be a finite number of seconds >= 0, got {state['elapsed_s']!r}"
        )
    config = state.get("train_config", {})
    if not (isinstance(config, dict) and all(isinstance(k, str) for k in config)):
        raise CheckpointError(path, "train_state.train_config", "must be a JSON object")
    return state


def _optimizer_groups(path: Path, metadata: Mapping[str, str], cfg: AUNNConfig) -> list[dict[str, Any]] | None:
    groups = _json_field(path, metadata, "optimizer_groups", required=False)
    if groups is None:
        return None
    count = len(param_shapes(cfg))
    if not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)):
        raise CheckpointError(path, "optimizer_groups", "must be a JSON list of objects")
    if len(groups) != 1 or groups[0].get("params") != list(range(count)):
        raise CheckpointError(
            path,
            "optimizer_groups",
            f"must be one group of the parameters 0..{count - 1}, got {[g.get('params') for g in groups]!r}",
        )
    return groups


# -- the seed notebook's layout: nn.Sequential(Linear, SiLU, RMSNorm) per layer ---------------

SEED_KEYS = {  # AUNNParams name -> seed state-dict key
    "in_weight": "input_layer.0.weight",
    "in_bias": "input_layer.0.bias",
    "in_gain": "input_layer.2.weight",
    "out_weight": "output_layer.weight",
    "out_bias": "output_layer.bias",
}
SEED_LAYER_KEYS = {"hidden_weight": "0.weight", "hidden_bias": "0.bias", "hidden_gain": "2.weight"}  # layers.{i}.*


def _seed_tensor(
    state_dict: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """state_dict[key], checked to be a finite floating-point tensor (of the given shape); an error naming the
    key otherwise."""
    if key not in state_dict:
        raise UserInputError(f"not a seed AUNN state dict: missing {key!r}")
    tensor = state_dict[key]
    if not isinstance(tensor, torch.Tensor):
        raise UserTypeError(f"seed state dict entry {key!r} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.dtype.is_floating_point:
        raise UserTypeError(f"seed state dict entry {key!r} must hold floating-point weights, got {tensor.dtype}")
    if shape is not None and tuple(tensor.shape) != shape:
        raise UserInputError(f"seed state dict entry {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
    if not bool(torch.isfinite(tensor).all()):
        raise UserInputError(f"seed state dict entry {key!r} holds non-finite values (NaN or infinity)")
    return tensor


def params_from_seed_state_dict(
    state_dict: Mapping[str, torch.Tensor], eps: float | None = None, residual_every: int = 2
) -> tuple[AUNNConfig, dict[str, torch.Tensor]]:
    """The config and parameters (named as :class:`AUNNParams`) of the seed notebook's state dict.

    input_layer.0.weight [H, bits] gives H and bits, output_layer.weight [V, H] the vocabulary, the
    number of ``layers.{i}`` entries the hidden layers. Every entry must be a finite floating-point
    tensor of the shape the config implies: UserInputError/UserTypeError name the first that is not.
    """
    if not isinstance(state_dict, Mapping):
        raise UserTypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    in_weight = _seed_tensor(state_dict, SEED_KEYS["in_weight"])
    out_weight = _seed_tensor(state_dict, SEED_KEYS["out_weight"])
    if in_weight.dim() != 2 or out_weight.dim() != 2:
        raise UserInputError(
            f"seed state dict entries {SEED_KEYS['in_weight']!r} and {SEED_KEYS['out_weight']!r} "
            f"must be 2-D, got shapes {tuple(in_weight.shape)} and {tuple(out_weight.shape)}"
        )
    (hidden, bits), vocab = in_weight.shape, out_weight.shape[0]
    n_hidden = len({key.split(".")[1] for key in state_dict if key.startswith("layers.")})
    cfg = AUNNConfig(
        vocab_size=vocab, hidden=hidden, layers=n_hidden + 2, bits=bits, eps=eps, residual_every=residual_every
    )
    shapes = param_shapes(cfg)
    params = {name: _seed_tensor(state_dict, key, shapes[name]) for name, key in SEED_KEYS.items()}
    for name, suffix in SEED_LAYER_KEYS.items():
        layers = [_seed_tensor(state_dict, f"layers.{i}.{suffix}", shapes[name][1:]) for i in range(n_hidden)]
        params[name] = torch.stack(layers) if layers else torch.empty(shapes[name])
    return cfg, params


def seed_state_dict(params: Mapping[str, torch.Tensor], hidden_layers: int) -> dict[str, torch.Tensor]:
    """Parameters named as :class:`AUNNParams` as detached copies under the seed notebook's keys."""
    sd = {key: params[name] for name, key in SEED_KEYS.items()}
    for i in range(hidden_layers):
        sd.update({f"layers.{i}.{suffix}": params[name][i] for name, suffix in SEED_LAYER_KEYS.items()})
    return {k: v.detach().clone() for k, v in sd.items()}
