"""Checkpoints: exact round trip, clear errors for truncated or foreign files, the seed layout."""
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from aunn_fast import AUNN, AUNNConfig

from helpers import random_indices, random_model


@pytest.fixture
def model(generator):
    m = random_model(AUNNConfig(vocab_size=3, hidden=16, layers=5, bits=33, residual_every=1), generator)
    m.vocab = ["x", "y", "z"]
    m.data_description = {"kind": "toy", "chunks": 7, "seed": 1, "length": 28}
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


def test_truncated_checkpoint_is_a_value_error(model, tmp_path):
    path = tmp_path / "m.safetensors"
    model.save(path)
    data = path.read_bytes()
    for cut in (len(data) // 2, 20, 4):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable checkpoint"):
            AUNN.load(path)


def test_foreign_safetensors_file_is_a_value_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not an aunn_fast checkpoint"):
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
    with pytest.raises(ValueError, match="not a readable checkpoint"):
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


@pytest.mark.parametrize("tensors, metadata, expected", [
    ({"out_bias": None}, None, "missing parameters: out_bias"),
    ({"hidden_weight": torch.zeros(3, 16, 15)}, None, r"hidden_weight has shape \(3, 16, 15\)"),
    ({"in_weight": torch.zeros(33, 16)}, None, r"in_weight has shape \(33, 16\), expected \(16, 33\)"),  # transposed
    (None, {"config": None}, "has no valid config"),
    (None, {"config": "{not json"}, "has no valid config"),
    (None, {"config": '{"vocab_size": 1, "hidden": 16, "layers": 5, "bits": 33}'}, "has no valid config"),
])
def test_an_aunn_checkpoint_with_bad_contents_is_a_value_error(model, tmp_path, tensors, metadata, expected):
    path = _edited_checkpoint(model, tmp_path / "m.safetensors", tensors, metadata)
    with pytest.raises(ValueError, match=expected):
        AUNN.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        AUNN.load(tmp_path / "nope.safetensors")


def test_seed_state_dict_round_trip(model, generator):
    sd = model.to_seed_state_dict()
    assert set(sd) >= {"input_layer.0.weight", "input_layer.0.bias", "input_layer.2.weight",
                       "layers.2.0.weight", "layers.2.2.weight", "output_layer.weight", "output_layer.bias"}
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
    with pytest.raises(ValueError, match=r"must be 2-D, got shapes \(16,\) and \(3, 16\)"):
        AUNN.from_seed_state_dict(sd)
    with pytest.raises(ValueError, match="not a seed AUNN state dict"):
        AUNN.from_seed_state_dict({"foo": torch.zeros(1)})


@pytest.mark.parametrize("missing,named", [
    (["input_layer.0.bias"], "input_layer.0.bias"),
    (["layers.1.2.weight"], "layers.1.2.weight"),
    (["layers.0.0.weight", "layers.0.0.bias", "layers.0.2.weight"], "layers.0.0.weight"),
])
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
