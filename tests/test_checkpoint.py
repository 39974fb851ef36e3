"""Checkpoints: exact round trip, clear errors for truncated or foreign files, the seed layout."""

import os
import re
import stat

import pytest
import torch
from safetensors.torch import save_file

from aunn_fast import AUNN, AUNNConfig, checkpoint
from aunn_fast.errors import CheckpointError, MissingFileError

from helpers import random_indices, random_model


@pytest.fixture
def model(generator):
    m = random_model(AUNNConfig(vocab_size=4, hidden=16, layers=5, bits=33, residual_every=1), generator)
    m.vocab = ["w", "x", "y", "z"]
    m.data_description = {"kind": "text", "path": "/data/wxyz.txt", "length": 28}
    return m


def test_round_trip_is_exact(model, tmp_path, generator):
    path = tmp_path / "m.safetensors"
    model.save(path)
    loaded = AUNN.load(path)
    assert loaded.cfg == model.cfg and loaded.vocab == model.vocab
    assert loaded.data_description == model.data_description
    for a, b in zip(model.params, loaded.params):
        assert torch.equal(a, b)
    idx = random_indices(10, 33, generator)
    assert torch.equal(model(idx), loaded(idx))
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_checkpoint_is_a_checkpoint_error(model, tmp_path):
    path = tmp_path / "m.safetensors"
    model.save(path)
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 20, 4, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            AUNN.load(path)


def test_foreign_safetensors_file_is_a_value_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="format: .*not an aunn_fast checkpoint"):
        AUNN.load(path)


class _Booby:
    """Unpickling this calls _Booby.trip: a load that unpickled would be seen."""

    tripped = False

    @classmethod
    def trip(cls) -> None:
        cls.tripped = True

    def __reduce__(self):
        return (_Booby.trip, ())


def test_pickle_is_never_loaded(model, tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"state": model.state_dict(), "booby": _Booby()}, path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        AUNN.load(path)
    assert not _Booby.tripped


def _edited_checkpoint(model, path, tensors=None, metadata=None):
    """model's checkpoint with some tensors and metadata replaced (None: removed)."""
    from safetensors import safe_open

    model.save(path)
    with safe_open(str(path), framework="pt") as f:
        saved = {name: f.get_tensor(name) for name in f.keys()}
        meta = f.metadata()
    for name, tensor in (tensors or {}).items():
        saved.pop(name) if tensor is None else saved.__setitem__(name, tensor)
    for key, value in (metadata or {}).items():
        meta.pop(key) if value is None else meta.__setitem__(key, value)
    save_file(saved, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "tensors, metadata, expected",
    [
        ({"out_bias": None}, None, "tensor 'out_bias': missing"),
        ({"hidden_weight": torch.zeros(3, 16, 15)}, None, r"tensor 'hidden_weight': shape \(3, 16, 15\), expected"),
        ({"in_weight": torch.zeros(33, 16)}, None, r"'in_weight': shape \(33, 16\), expected \(16, 33\)"),  # transposed
        ({"in_bias": torch.zeros(16, dtype=torch.int32)}, None, "'in_bias': dtype I32, expected F32"),
        ({"in_gain": torch.ones(16, dtype=torch.bool)}, None, "'in_gain': dtype BOOL"),
        ({"out_weight": torch.zeros(4, 16, dtype=torch.uint8)}, None, "'out_weight': dtype U8"),
        ({"out_bias": torch.tensor([0.0, float("nan"), 0.0, 0.0])}, None, "'out_bias': holds non-finite values"),
        ({"in_bias": torch.full((16,), float("inf"))}, None, "'in_bias': holds non-finite"),
        ({"stray": torch.zeros(1)}, None, "'stray': not a parameter"),
        ({"extra.optim.0.exp_avg": torch.zeros(3)}, None, r"'extra.optim.0.exp_avg': shape \(3,\)"),
        ({"extra.optim.9.exp_avg": torch.zeros(3)}, None, "'extra.optim.9.exp_avg': not optimizer state"),
        (None, {"config": None}, "config: missing"),
        (None, {"config": "{not json"}, "config: not valid JSON"),
        (None, {"config": "[1, 2]"}, "config: must be a JSON object"),
        (
            None,
            {"config": '{"vocab_size": 1, "hidden": 16, "layers": 5, "bits": 33}'},
            "config: vocab_size must be >= 2",
        ),
        (None, {"config": '{"vocab_size": 4, "hidden": 16, "layers": 5}'}, "config.bits: missing"),
        (None, {"config": '{"vocab_size": 4, "hidden": 16, "layers": 5, "bits": 33, "depth": 3}'}, "config.depth"),
        (
            None,
            {"config": '{"vocab_size": 4, "hidden": 8192, "layers": 5, "bits": 33, "residual_every": 1}'},
            r"'in_weight': shape \(16, 33\), expected \(8192, 33\)",
        ),
        (None, {"config": '{"vocab_size": 4, "hidden": "16", "layers": 5, "bits": 33}'}, "config: .*must be an int"),
        (None, {"vocab": '["w", "x"]'}, "vocab: must list 4 distinct characters"),
        (None, {"vocab": '["w", "x", "y", "y"]'}, "vocab: must list 4 distinct"),
        (None, {"vocab": '{"a": 1}'}, "vocab: must be null"),
        (None, {"vocab": "7"}, "vocab: 7 token ids, but config.vocab_size is 4"),
        (None, {"data": '{"chunks": 7, "seed": 1, "length": 28}'}, "data.kind: must be one of"),
        (None, {"data": '{"kind": "toy", "seed": 1, "length": 28}'}, "data.chunks: missing"),
        (None, {"data": '{"kind": "toy", "chunks": 7, "seed": 1, "length": 28}'}, "vocab: toy data's vocabulary is"),
        (None, {"data": '{"kind": "bytes", "path": "/a", "length": 28}'}, "vocab: bytes data has 256 tokens"),
        (None, {"data": '{"kind": "tokens", "path": "/a", "length": 28, "vocab_size": 5}'}, "data.vocab_size: must be"),
        (None, {"data": '{"kind": "text", "path": "/a", "length": 28, "sha256": "abc"}'}, "data.sha256: must be 64"),
        (None, {"data": '{"kind": "toy", "chunks": 7, "seed": -1, "length": 28}'}, "data.seed: must be"),
        (None, {"data": '{"kind": "toy", "chunks": 7, "seed": 1, "length": 29}'}, "data.chunks: must be"),
        (None, {"data": '{"kind": "text", "length": 28}'}, "data.path: missing"),
        (None, {"data": '"toy"'}, "data: must be a JSON object"),
        (None, {"train_state": '{"step": -5}'}, "train_state.step: must be an integer >= 0, got -5"),
        (None, {"train_state": "{}"}, "train_state.step: must be an integer >= 0, got None"),
        (None, {"train_state": '{"step": 2.5}'}, "train_state.step"),
        (None, {"train_state": '{"step": 3, "elapsed_s": -1}'}, "train_state.elapsed_s"),
        (None, {"train_state": '{"step": 3, "train_config": [1]}'}, "train_state.train_config"),
        (None, {"optimizer_groups": '[{"params": [0, 1]}]'}, "optimizer_groups: must be one group"),
        (None, {"optimizer_groups": '{"params": 1}'}, "optimizer_groups: must be a JSON list"),
    ],
)
def test_an_aunn_checkpoint_with_bad_contents_is_refused_naming_the_field(model, tmp_path, tensors, metadata, expected):
    path = _edited_checkpoint(model, tmp_path / "m.safetensors", tensors, metadata)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: .*{expected}"):
        AUNN.load(path)


def test_optimizer_state_is_validated_whole(model, tmp_path):
    """Moments of every parameter, finite, second moments >= 0; a partial state is refused."""
    moments = {
        f"optim.{i}.{key}": (torch.zeros(()) if key == "step" else torch.zeros(p.shape))
        for i, p in enumerate(model.params)
        for key in ("step", "exp_avg", "exp_avg_sq")
    }
    model.save(tmp_path / "ok.safetensors", extra=moments)
    assert checkpoint.load(tmp_path / "ok.safetensors").has_optimizer_state
    for name, value in [
        ("optim.3.exp_avg", None),
        ("optim.5.step", None),
        ("optim.0.exp_avg_sq", -torch.ones(16, 33)),
        ("optim.7.exp_avg", torch.full((4,), float("nan"))),
        ("optim.2.step", torch.zeros(1)),
    ]:
        edited = {k: v for k, v in moments.items() if k != name}
        if value is not None:
            edited[name] = value
        model.save(tmp_path / "bad.safetensors", extra=edited)
        with pytest.raises(CheckpointError, match=f"'extra.{name}'"):
            checkpoint.load(tmp_path / "bad.safetensors")


def test_a_huge_config_in_a_small_file_is_refused_before_allocating(model, tmp_path, monkeypatch):
    """hidden=8192 in a file of a few KB: refused from the header, before the model or a tensor exists."""
    path = _edited_checkpoint(
        model,
        tmp_path / "m.safetensors",
        metadata={"config": '{"vocab_size": 4, "hidden": 8192, "layers": 5, "bits": 33, "residual_every": 1}'},
    )
    monkeypatch.setattr(checkpoint, "_read_tensors", lambda *a: pytest.fail("tensors read before validation"))
    monkeypatch.setattr(AUNN, "__init__", lambda *a, **k: pytest.fail("model built before validation"))
    with pytest.raises(CheckpointError, match="8192"):
        AUNN.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        AUNN.load(tmp_path / "nope.safetensors")
    assert isinstance(raised.value, MissingFileError)


def test_seed_state_dict_round_trip(model, generator):
    sd = model.to_seed_state_dict()
    assert set(sd) >= {
        "input_layer.0.weight",
        "input_layer.0.bias",
        "input_layer.2.weight",
        "layers.2.0.weight",
        "layers.2.2.weight",
        "output_layer.weight",
        "output_layer.bias",
    }
    rebuilt = AUNN.from_seed_state_dict(sd, residual_every=1, backend=model.backend)
    assert rebuilt.cfg == model.cfg
    idx = random_indices(10, 33, generator)
    assert torch.equal(rebuilt(idx), model(idx))
    assert all(torch.equal(sd[k], v) for k, v in rebuilt.to_seed_state_dict().items())


def test_seed_state_dict_with_wrong_shapes_is_rejected(model):
    sd = model.to_seed_state_dict()
    sd["layers.1.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"'layers.1.0.weight' has shape \(3, 3\), expected \(16, 16\)"):
        AUNN.from_seed_state_dict(sd)
    sd = model.to_seed_state_dict()
    sd["input_layer.0.weight"] = torch.zeros(16)
    with pytest.raises(ValueError, match=r"must be 2-D, got shapes \(16,\) and \(4, 16\)"):
        AUNN.from_seed_state_dict(sd)
    with pytest.raises(ValueError, match="not a seed AUNN state dict"):
        AUNN.from_seed_state_dict({"foo": torch.zeros(1)})


@pytest.mark.parametrize(
    "key, value, error, expected",
    [
        ("layers.1.0.weight", lambda t: t.to(torch.int64), TypeError, "'layers.1.0.weight' must hold floating-point"),
        ("input_layer.0.weight", lambda t: t.to(torch.int32), TypeError, "'input_layer.0.weight' must hold floating"),
        ("output_layer.bias", lambda t: t.bool(), TypeError, "'output_layer.bias' must hold floating-point"),
        ("layers.0.2.weight", lambda t: t.fill_(float("nan")), ValueError, "'layers.0.2.weight' holds non-finite"),
        ("input_layer.0.bias", lambda t: t.fill_(float("-inf")), ValueError, "'input_layer.0.bias' holds non-finite"),
    ],
)
def test_seed_state_dict_with_integer_or_non_finite_weights_is_refused(model, key, value, error, expected):
    sd = model.to_seed_state_dict()
    sd[key] = value(sd[key])
    with pytest.raises(error, match=expected):
        AUNN.from_seed_state_dict(sd, residual_every=1)


@pytest.mark.parametrize(
    "missing,named",
    [
        (["input_layer.0.bias"], "input_layer.0.bias"),
        (["layers.1.2.weight"], "layers.1.2.weight"),
        (["layers.0.0.weight", "layers.0.0.bias", "layers.0.2.weight"], "layers.0.0.weight"),
    ],
)
def test_seed_state_dict_with_missing_entries_names_them(model, missing, named):
    sd = model.to_seed_state_dict()
    for key in missing:
        del sd[key]
    with pytest.raises(ValueError, match=f"missing '{named}'"):
        AUNN.from_seed_state_dict(sd, residual_every=1)


@pytest.mark.parametrize("device", ["foo", "cuda:99"])
def test_unusable_map_location_is_named_not_blamed_on_the_file(model, tmp_path, device):
    path = tmp_path / "m.safetensors"
    model.save(path)
    with pytest.raises(ValueError, match=f"device '{device}' is not usable") as raised:
        AUNN.load(path, map_location=device)
    assert "not a readable checkpoint" not in str(raised.value)


def test_checkpoint_file_mode_follows_the_umask(model, tmp_path):
    old = os.umask(0o022)
    try:
        model.save(tmp_path / "m.safetensors")
        os.umask(0o027)
        model.save(tmp_path / "n.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "n.safetensors").stat().st_mode) == 0o640


def test_load_keeps_the_asked_backend_and_precision(tmp_path):
    AUNN(AUNNConfig(vocab_size=4, hidden=16, layers=3), seed=0).save(tmp_path / "m.safetensors")
    loaded = AUNN.load(tmp_path / "m.safetensors", backend="reference", precision="bf16")
    assert (loaded.backend, loaded.precision) == ("reference", "bf16")


def test_seed_state_dict_holds_copies():
    model = AUNN(AUNNConfig(vocab_size=4, hidden=16, layers=4), seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    for t in model.to_seed_state_dict().values():
        t.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
