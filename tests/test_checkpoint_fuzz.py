"""Fuzzing the checkpoint reader: random truncations, byte flips and metadata mutations of a real training
checkpoint each load correctly or raise the package's own error (aunn_fast.errors.AUNNError), never another
exception. A fixed number of cases (CI pays about a second), from a fresh seed printed with every run."""

from __future__ import annotations

import json
import os
import random

import pytest

from aunn_fast import AUNN, checkpoint
from aunn_fast.cli import main
from aunn_fast.errors import AUNNError
from aunn_fast.train import CHECKPOINT_NAME

CASES = 300
ODD_VALUES = [
    None,
    -5,
    0,
    1,
    2.5,
    float("nan"),
    float("inf"),
    2**70,
    -(2**70),
    True,
    "",
    "x",
    "toy",
    [],
    [1, 2],
    {},
    {"kind": "toy"},
    "F32",
    [16, 8],
    "\u00e9" * 3,
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The bytes of a real checkpoint of a training run (optimizer state, train state, toy data)."""
    out = tmp_path_factory.mktemp("fuzz") / "run"
    assert (
        main(
            [
                "train",
                "--data",
                "toy:8",
                "--out",
                str(out),
                "--hidden",
                "8",
                "--layers",
                "4",
                "--steps",
                "2",
                "--batch-size",
                "8",
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    return (out / CHECKPOINT_NAME).read_bytes()


def _split(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def _mutate_value(value, rng: random.Random):
    """value (parsed JSON) with one random change somewhere inside it: a leaf replaced, a key removed or added."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        action = rng.random()
        if action < 0.25:
            return {k: v for k, v in value.items() if k != key}
        if action < 0.35:
            return {**value, rng.choice(["extra", "kind", "step", "hidden"]): rng.choice(ODD_VALUES)}
        return {**value, key: _mutate_value(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        return value[:i] + [_mutate_value(value[i], rng)] + value[i + 1 :]
    return rng.choice(ODD_VALUES)


def _mutations(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of the checkpoint's bytes, and what it was."""
    kind = rng.choice(["truncate", "flip", "flip", "metadata", "metadata", "tensor header"])
    if kind == "truncate":
        cut = rng.randrange(len(data))
        return f"truncated at {cut}", data[:cut]
    if kind == "flip":
        flipped = bytearray(data)
        where = [rng.randrange(len(data)) for _ in range(rng.choice([1, 1, 2, 8]))]
        for i in where:
            flipped[i] ^= 1 << rng.randrange(8)
        return f"bits flipped at {where}", bytes(flipped)
    header, body = _split(data)
    if kind == "metadata":
        metadata = header["__metadata__"]
        key = rng.choice(sorted(metadata))
        if rng.random() < 0.15:
            header["__metadata__"] = {k: v for k, v in metadata.items() if k != key}
            return f"metadata {key} removed", _join(header, body)
        if rng.random() < 0.1:
            metadata[key] = "{not json"
            return f"metadata {key} not JSON", _join(header, body)
        if key == "format":  # the one value that is not JSON
            metadata[key] = rng.choice(["", "aunn_fast/2", "safetensors", metadata[key] + " "])
        else:
            metadata[key] = json.dumps(_mutate_value(json.loads(metadata[key]), rng))
        return f"metadata {key} = {metadata[key]}", _join(header, body)
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    header[name] = _mutate_value(header[name], rng)
    return f"tensor header {name} = {header[name]}", _join(header, body)


def test_every_mutation_loads_or_raises_the_packages_own_error(saved, tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"fuzz seed: {seed}")
    rng = random.Random(seed)
    path = tmp_path / CHECKPOINT_NAME
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(CASES):
        what, data = _mutations(saved, rng)
        path.write_bytes(data)
        try:
            ckpt = checkpoint.load(path)
            AUNN.from_checkpoint(ckpt, backend="reference")
            outcomes["loaded"] += 1
        except AUNNError:
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"fuzz seed {seed}, case {case} ({what}): {type(exc).__name__}: {exc}")
    print(outcomes)
    assert outcomes["refused"] > CASES // 4  # the mutations reach the checks: most break the file


def test_the_unmutated_checkpoint_loads_whole(saved, tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(saved)
    ckpt = checkpoint.load(path)
    assert ckpt.train_state["step"] == 2 and ckpt.has_optimizer_state and ckpt.optimizer_groups
    assert ckpt.data_description["kind"] == "toy" and ckpt.vocab == ["|", "a", "b", "c"]
