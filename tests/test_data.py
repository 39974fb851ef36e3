"""Datasets: determinism of the toy sequence, text and byte vocabularies, spec parsing."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import aunn_fast.data as data_module
from aunn_fast.data import BytesData, TextData, TokensData, ToyData, data_from_description, decode, encode, load_data

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def test_toy_sequence_has_the_seed_structure():
    data = ToyData(chunks=500, seed=3)
    text = decode(data.targets(torch.arange(data.length)), data.vocab)
    assert len(text) == 2000
    chunks = [text[i : i + 4] for i in range(0, len(text), 4)]
    assert set(chunks) == {"|aaa", "|bbb", "|ccc"}


def _toy_token(index: int, seed: int) -> int:
    """The toy sequence's token at index, in plain Python integers: SplitMix64's finalizer mod 2^64."""
    mask = (1 << 64) - 1

    def mix(x: int) -> int:
        x &= mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    return 0 if index % 4 == 0 else 1 + (mix(index // 4 + mix(seed)) >> 1) % 3


def test_toy_is_a_pure_function_of_seed_and_chunk(generator):
    a, b = ToyData(100, seed=7), ToyData(10**9, seed=7)
    idx = torch.randint(0, 400, (300,), generator=generator)
    assert torch.equal(a.targets(idx), b.targets(idx))
    far = torch.cat(
        [torch.randint(0, 2**62, (300,), generator=generator) * 2, 2**63 - 1 - torch.arange(64), torch.arange(64)]
    )
    assert b.targets(far).tolist() == [_toy_token(i, 7) for i in far.tolist()]
    assert not torch.equal(ToyData(100, seed=8).targets(torch.arange(400)), a.targets(torch.arange(400)))


def test_toy_targets_from_the_table_equal_the_hash():
    """Small toy data answers in-range batches from a token table; it holds exactly what the hash gives, and
    indices outside the data (or data above the table's limit) still get the hash."""
    small, large = ToyData(100, seed=7), ToyData(ToyData.TABLE_MAX_LENGTH, seed=7)  # 4x the limit: no table
    inside = torch.randint(0, 400, (64,))
    across = torch.tensor([0, 399, 400, 10**12])
    assert torch.equal(small.targets(inside), large.targets(inside)) and small._tables and not large._tables
    assert torch.equal(small.targets(across), large.targets(across))
    assert torch.equal(small.targets(inside.reshape(8, 8)), large.targets(inside).reshape(8, 8))


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


@pytest.mark.parametrize(
    "dtype,suffix",
    [(np.uint16, ".bin"), (np.uint16, ".npy"), (np.int64, ".npy"), (np.int32, ".npy"), (np.uint8, ".npy")],
)
@pytest.mark.parametrize("scan_chunk", [1 << 26, 7])
def test_token_file_ids_and_vocabulary(tmp_path, generator, monkeypatch, dtype, suffix, scan_chunk):
    monkeypatch.setattr(data_module, "SCAN_CHUNK_TOKENS", scan_chunk)
    top = min(int(np.iinfo(dtype).max), 50_256)
    ids = torch.randint(0, top, (1000,), generator=generator)
    ids[int(torch.randint(0, 1000, (1,), generator=generator))] = top  # the largest id somewhere inside
    path = tmp_path / f"corpus{suffix}"
    array = ids.numpy().astype(dtype)
    path.write_bytes(array.astype("<u2").tobytes()) if suffix == ".bin" else np.save(path, array)
    data = load_data(f"tokens:{path}")
    assert isinstance(data, TokensData) and data.length == 1000
    assert data.vocab_size == top + 1 and data.vocab == top + 1
    idx = torch.randint(0, 1000, (64, 3), generator=generator)
    assert data.targets(idx).dtype == torch.int64 and torch.equal(data.targets(idx), ids[idx])
    description = data.describe()
    assert description["vocab_size"] == top + 1
    with monkeypatch.context() as patch:  # an unchanged file is neither hashed nor scanned again
        patch.setattr(data_module, "file_sha256", lambda path: pytest.fail("an untouched file was hashed"))
        patch.setattr(TokensData, "_scan", lambda self: pytest.fail("an untouched file was scanned"))
        reopened = data_from_description(description, data.vocab)
    assert reopened.vocab_size == top + 1 and torch.equal(reopened.targets(idx), ids[idx])


def test_token_ids_read_as_numbers():
    assert encode("17 0,  350", 351) == [17, 0, 350]
    assert decode(torch.tensor([17, 0, 350]), 351) == "17 0 350"
    for bad in ("351", "-1", "1.5", "a"):
        with pytest.raises(ValueError, match="expected token ids in 0..350"):
            encode(bad, 351)


def test_token_files_refused_with_the_reason(tmp_path):
    cases = {
        "odd.bin": (b"\x01\x00\x02", "size is odd"),
        "empty.bin": (b"", "holds no tokens"),
        "ids.txt": (b"1 2 3", "a .npy array or a .bin"),
    }
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=reason):
            load_data(f"tokens:{tmp_path / name}")
    arrays = {
        "negative.npy": (np.array([3, -1, 2]), "negative token id"),
        "float.npy": (np.array([1.0, 2.0]), "1-D integer array"),
        "matrix.npy": (np.zeros((2, 3), dtype=np.int32), "1-D integer array"),
        "huge.npy": (np.array([0, 2**40]), "too large"),
    }
    for name, (array, reason) in arrays.items():
        np.save(tmp_path / name, array)
        with pytest.raises(ValueError, match=reason):
            load_data(f"tokens:{tmp_path / name}")
    np.save(tmp_path / "cut.npy", np.arange(100, dtype=np.int32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:150])
    with pytest.raises(ValueError, match="not a readable .npy"):
        load_data(f"tokens:{tmp_path / 'cut.npy'}")
    np.save(tmp_path / "none.npy", np.zeros(0, dtype=np.int32))
    with pytest.raises(ValueError, match="holds no tokens"):
        load_data(f"tokens:{tmp_path / 'none.npy'}")
    np.save(tmp_path / "zeros.npy", np.zeros(5, dtype=np.int32))
    assert load_data(f"tokens:{tmp_path / 'zeros.npy'}").vocab_size == 2  # a model needs two classes


def _random_text(generator, length: int, alphabet: str) -> str:
    picks = torch.randint(0, len(alphabet), (length,), generator=generator).tolist()
    return "".join(alphabet[i] for i in picks)


@pytest.mark.parametrize("alphabet", ["ab\n", "aé€😀\u0000 ", "".join(chr(0x4E00 + i) for i in range(300))])
@pytest.mark.parametrize("chunk", [7, 1 << 24])
def test_text_data_encodes_like_the_python_encoder(tmp_path, generator, monkeypatch, alphabet, chunk):
    monkeypatch.setattr(data_module, "TEXT_CHUNK_CHARS", chunk)
    text = _random_text(generator, 2000, alphabet)
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    data = TextData(path)
    assert data.vocab == sorted(set(text)) and data.length == len(text)
    assert data.targets(torch.arange(len(text))).tolist() == encode(text, data.vocab)
    assert data.targets(torch.tensor([3])).dtype == torch.int64
    assert data.array.itemsize == (1 if len(data.vocab) <= 256 else 2)
    wider = sorted(set(text) | {"Z", "ü"})  # a checkpoint's vocabulary may hold characters the file lacks
    assert TextData(path, wider).targets(torch.arange(len(text))).tolist() == encode(text, wider)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        TextData(path, sorted(set(text))[1:])


def _set_mtime(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_file_data_reopens_only_unchanged_files(tmp_path, monkeypatch):
    text, raw, ids = tmp_path / "t.txt", tmp_path / "b.bin", tmp_path / "tokens.bin"
    text.write_text("abcabc", encoding="utf-8")
    raw.write_bytes(b"\x00\x01\x02\x03")
    ids.write_bytes(b"\x00\x01\x02\x03")
    for data, same_length_edit, longer in (
        (TextData(text), "abcacb", "abcabca"),
        (BytesData(raw), b"\x00\x01\x03\x02", b"\x00\x01\x02\x03\x04"),
        (TokensData(ids), b"\x02\x03\x00\x01", b"\x00\x01\x02\x03\x04\x00"),
    ):
        description = data.describe()
        assert description["sha256"] == hashlib.sha256(data.path.read_bytes()).hexdigest()
        assert data_from_description(description, data.vocab).describe() == description
        old_checkpoint = {k: v for k, v in description.items() if k not in ("sha256", "size", "mtime_ns")}
        assert data_from_description(old_checkpoint, data.vocab).length == data.length
        write = data.path.write_text if isinstance(same_length_edit, str) else data.path.write_bytes
        write(same_length_edit)
        _set_mtime(data.path, description["mtime_ns"] + 10**9)  # what an edit does, on any clock granularity
        with pytest.raises(ValueError, match="changed since the checkpoint was saved .sha256"):
            data_from_description(description, data.vocab)
        edited = hashlib.sha256(data.path.read_bytes()).hexdigest()  # a touched file is hashed; equal is fine
        assert data_from_description({**description, "sha256": edited}, data.vocab).sha256 == edited
        _set_mtime(data.path, description["mtime_ns"])  # size and time as recorded: the recorded hash stands
        with monkeypatch.context() as patch:
            patch.setattr(data_module, "file_sha256", lambda path: pytest.fail("an untouched file was hashed"))
            assert data_from_description(description, data.vocab).sha256 == description["sha256"]
        write(longer)
        with pytest.raises(ValueError, match="changed since the checkpoint was saved .was"):
            data_from_description(old_checkpoint, data.vocab)
        data.path.unlink()
        with pytest.raises(FileNotFoundError):
            data_from_description(description, data.vocab)


@pytest.mark.parametrize("vocab", [256, 3000, 50_257])
def test_mapped_ids_copied_to_the_device_give_the_same_targets(tmp_path, generator, monkeypatch, vocab):
    """Bytes (vocab 256) and token files: the device copy, in the narrowest dtype (uint8, int16, int32),
    made in chunks that do not divide the file, gives what the memory map gives."""
    ids = torch.randint(0, vocab, (1000,), generator=generator)
    ids[0] = vocab - 1
    path = tmp_path / "ids.bin"
    path.write_bytes(ids.numpy().astype(np.uint8 if vocab == 256 else "<u2").tobytes())
    kind = BytesData if vocab == 256 else TokensData
    idx = torch.randint(0, 1000, (64, 3), generator=generator)
    gathered = kind(path).targets(idx)
    assert torch.equal(gathered, ids[idx]) and gathered.dtype == torch.int64
    monkeypatch.setattr(data_module, "COPY_CHUNK_BYTES", 300)
    monkeypatch.setattr(kind, "fits_on", lambda self, device: True)
    copy = kind(path)._device_copy(torch.device("cpu"))  # what a GPU gets, made here on the CPU
    assert copy is not None and copy.element_size() == {256: 1, 3000: 2, 50_257: 4}[vocab]
    assert torch.equal(copy.long(), ids) and torch.equal(copy[idx].long(), gathered)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_file_data_on_the_gpu(tmp_path, generator):
    """CUDA indices: bytes, text and token files are copied to the GPU once; same targets as on the CPU."""
    raw, text, ids = tmp_path / "b.bin", tmp_path / "t.txt", tmp_path / "ids.npy"
    raw.write_bytes(bytes(torch.randint(0, 256, (5000,), generator=generator, dtype=torch.uint8).tolist()))
    text.write_text(_random_text(generator, 5000, "abcé😀\n"), encoding="utf-8")
    np.save(ids, torch.randint(0, 50_257, (5000,), generator=generator).numpy())
    idx = torch.randint(0, 5000, (4096,), generator=generator)
    for data in (BytesData(raw), TextData(text), TokensData(ids)):
        on_gpu = data.targets(idx.cuda())
        assert on_gpu.is_cuda and on_gpu.dtype == torch.int64 and torch.equal(on_gpu.cpu(), data.targets(idx))
    for copied in (BytesData(raw), TextData(text), TokensData(ids)):
        copied.targets(idx[:1].cuda())
        assert copied._copy is not None and copied._copy.is_cuda
        copied.targets(idx[:1])  # CPU indices read the memory map and keep the GPU copy
        assert copied._copy is not None and copied._copy.is_cuda


@pytest.mark.parametrize(
    "spec,error",
    [
        ("toy:abc", ValueError),
        ("toy:1:2:3", ValueError),
        ("text:", ValueError),
        ("text:/no/such/file", FileNotFoundError),
        ("csv:x", ValueError),
        ("toy:0", ValueError),
        ("tokens:", ValueError),
        ("tokens:/no/such/file.npy", FileNotFoundError),
    ],
)
def test_bad_specs(spec, error):
    with pytest.raises(error):
        load_data(spec)


def test_toy_spec():
    data = load_data("toy:12:5")
    assert (data.chunks, data.seed, data.length) == (12, 5, 48)
    assert load_data("toy").chunks == 100_000
    assert (load_data("toy::7").chunks, load_data("toy::7").seed) == (100_000, 7)  # an empty field: its default
    assert (load_data("toy:12:").chunks, load_data("toy:12:").seed) == (12, 0)
    for bad in ("toy:1:-2", "toy:-1", "toy:1.5", "toy:²"):
        with pytest.raises(ValueError, match="whole numbers"):
            load_data(bad)


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="shared/data/tinyshakespeare.txt is absent")
def test_tiny_shakespeare_vocabulary():
    data = load_data(f"text:{SHAKESPEARE}")
    assert data.length == 1_115_394 and data.vocab_size == 65
    assert decode(data.targets(torch.arange(9)), data.vocab) == "First Cit"
