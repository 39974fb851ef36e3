"""Datasets: determinism of the toy sequence, text and byte vocabularies, spec parsing."""
from pathlib import Path

import pytest
import torch

from aunn_fast.data import BytesData, TextData, ToyData, data_from_description, decode, encode, load_data

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def test_toy_sequence_has_the_seed_structure():
    data = ToyData(chunks=500, seed=3)
    text = decode(data.targets(torch.arange(data.length)), data.vocab)
    assert len(text) == 2000
    chunks = [text[i:i + 4] for i in range(0, len(text), 4)]
    assert set(chunks) == {"|aaa", "|bbb", "|ccc"}


def test_toy_is_a_pure_function_of_seed_and_chunk(generator):
    a, b = ToyData(100, seed=7), ToyData(10**9, seed=7)
    idx = torch.randint(0, 400, (300,), generator=generator)
    assert torch.equal(a.targets(idx), b.targets(idx))
    far = torch.randint(0, 2**62, (300,), generator=generator)
    assert torch.equal(b.targets(far), b.targets(far.clone()))
    assert not torch.equal(ToyData(100, seed=8).targets(torch.arange(400)), a.targets(torch.arange(400)))


def test_toy_letters_are_roughly_even():
    counts = torch.bincount(ToyData(30_000).letters(torch.arange(30_000)), minlength=4)[1:].double()
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.02


def test_text_data_round_trip(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello, wörld\n", encoding="utf-8")
    data = TextData(path)
    assert data.vocab == sorted(set("hello, wörld\n")) and data.length == 13
    assert decode(data.targets(torch.arange(13)), data.vocab) == "hello, wörld\n"
    reopened = data_from_description(data.describe(), data.vocab)
    assert torch.equal(reopened.targets(torch.arange(13)), data.targets(torch.arange(13)))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encode("xyz", data.vocab)


def test_bytes_data_is_memory_mapped(tmp_path):
    path = tmp_path / "b.bin"
    payload = bytes(range(256)) * 3
    path.write_bytes(payload)
    data = load_data(f"bytes:{path}")
    assert isinstance(data, BytesData) and data.vocab_size == 256 and data.length == 768
    idx = torch.tensor([0, 255, 256, 767])
    assert data.targets(idx).tolist() == [0, 255, 0, 255]
    assert encode("é", None) == list("é".encode()) and decode(encode("é", None), None) == "é"


@pytest.mark.parametrize("spec,error", [
    ("toy:abc", ValueError), ("toy:1:2:3", ValueError), ("text:", ValueError),
    ("text:/no/such/file", FileNotFoundError), ("csv:x", ValueError), ("toy:0", ValueError),
])
def test_bad_specs(spec, error):
    with pytest.raises(error):
        load_data(spec)


def test_toy_spec():
    data = load_data("toy:12:5")
    assert (data.chunks, data.seed, data.length) == (12, 5, 48)
    assert load_data("toy").chunks == 100_000


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="shared/data/tinyshakespeare.txt is absent")
def test_tiny_shakespeare_vocabulary():
    data = load_data(f"text:{SHAKESPEARE}")
    assert data.length == 1_115_394 and data.vocab_size == 65
    assert decode(data.targets(torch.arange(9)), data.vocab) == "First Cit"
