"""Datasets: a token for every absolute index, on any device.

Every dataset offers ``targets(idx)`` (int64 [...] -> int64 tokens [...], on idx's
device), its ``length`` N (valid indices are 0..N-1), a ``vocab`` (list of strings,
or None for raw bytes), and ``describe()``, a JSON-able dict that goes into every
checkpoint so the run can be reopened. Specs on the command line:

    toy[:CHUNKS[:SEED]]   the seed's sequence of `|aaa`, `|bbb`, `|ccc` chunks (default 100000 chunks)
    text:PATH             UTF-8 text, one token per character, vocabulary built from the file
    bytes:PATH            raw bytes, vocabulary 256, memory-mapped (files larger than RAM work)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch



def _signed(constant: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return constant - (1 << 64) if constant >= 1 << 63 else constant


def _shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 values."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 tensors (wrapping arithmetic): a cheap, well-mixed hash."""
    x = (x ^ _shift_right(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


class ToyData:
    """The seed's toy sequence: chunk c is `|` then three copies of one letter of `abc`.

    The letter is a pure function of (seed, c), so any index range, even far past the
    data, is generated on the fly without storing anything.
    """

    vocab = ["|", "a", "b", "c"]

    def __init__(self, chunks: int = 100_000, seed: int = 0) -> None:
        if chunks < 1:
            raise ValueError(f"toy data needs at least one chunk, got {chunks}")
        self.chunks, self.seed = chunks, seed
        self.length = 4 * chunks

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens."""
        return len(self.vocab)

    def letters(self, chunk: torch.Tensor) -> torch.Tensor:
        """int64 chunk numbers -> token id (1, 2 or 3) of each chunk's letter."""
        key = mix64(chunk.to(torch.int64) + mix64(torch.full_like(chunk, self.seed, dtype=torch.int64)))
        return 1 + _shift_right(key, 1) % 3

    def targets(self, idx: torch.Tensor) -> torch.Tensor:
        """int64 indices [...] (any, even past the data) -> int64 tokens [...] on idx's device."""
        idx = idx.to(torch.int64)
        return torch.where(idx % 4 == 0, torch.zeros_like(idx), self.letters(idx // 4))

    def describe(self) -> dict[str, Any]:
        """JSON-able description (kind, chunks, seed, length) that :func:`data_from_description` reopens."""
        return {"kind": "toy", "chunks": self.chunks, "seed": self.seed, "length": self.length}


class TextData:
    """UTF-8 text, one token per character; the vocabulary is the file's sorted characters."""

    def __init__(self, path: str | Path, vocab: list[str] | None = None) -> None:
        self.path = Path(path)
        text = self.path.read_text(encoding="utf-8")
        if not text:
            raise ValueError(f"{self.path} is empty")
        self.vocab = vocab if vocab is not None else sorted(set(text))
        self.tokens = torch.tensor(encode(text, self.vocab), dtype=torch.int64)
        self.length = len(text)

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens."""
        return len(self.vocab)

    def targets(self, idx: torch.Tensor) -> torch.Tensor:
        """int64 indices [...] in 0..length-1 -> int64 tokens [...] on idx's device."""
        if self.tokens.device != idx.device:
            self.tokens = self.tokens.to(idx.device)
        return self.tokens[idx]

    def describe(self) -> dict[str, Any]:
        """JSON-able description (kind, absolute path, length) that :func:`data_from_description` reopens."""
        return {"kind": "text", "path": str(self.path.resolve()), "length": self.length}


class BytesData:
    """Raw bytes of a file, memory-mapped; vocabulary 256 (decoded as UTF-8 for display)."""

    vocab = None
    vocab_size = 256

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.length = self.path.stat().st_size
        if self.length == 0:
            raise ValueError(f"{self.path} is empty")
        self.array = np.memmap(self.path, dtype=np.uint8, mode="r")

    def targets(self, idx: torch.Tensor) -> torch.Tensor:
        """int64 indices [...] in 0..length-1 -> int64 byte values [...] on idx's device."""
        picked = self.array[idx.detach().cpu().numpy()]
        return torch.from_numpy(picked.astype(np.int64)).to(idx.device)

    def describe(self) -> dict[str, Any]:
        """JSON-able description (kind, absolute path, length) that :func:`data_from_description` reopens."""
        return {"kind": "bytes", "path": str(self.path.resolve()), "length": self.length}


Dataset = ToyData | TextData | BytesData


def load_data(spec: str) -> Dataset:
    """Open a dataset from its command-line spec (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "toy":
        parts = [p for p in rest.split(":") if p] if rest else []
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"toy spec is toy[:CHUNKS[:SEED]], got {spec!r}") from None
        if len(numbers) > 2:
            raise ValueError(f"toy spec is toy[:CHUNKS[:SEED]], got {spec!r}")
        return ToyData(*numbers)
    if kind in ("text", "bytes"):
        if not rest:
            raise ValueError(f"{kind} spec needs a path: {kind}:PATH")
        if not Path(rest).is_file():
            raise FileNotFoundError(f"no such data file: {rest}")
        return TextData(rest) if kind == "text" else BytesData(rest)
    raise ValueError(f"unknown data spec {spec!r}; use toy[:CHUNKS[:SEED]], text:PATH or bytes:PATH")


def data_from_description(description: dict[str, Any], vocab: list[str] | None = None) -> Dataset:
    """Reopen the dataset a checkpoint was trained on."""
    kind = description["kind"]
    if kind == "toy":
        return ToyData(description["chunks"], description["seed"])
    if kind == "text":
        return TextData(description["path"], vocab)
    if kind == "bytes":
        return BytesData(description["path"])
    raise ValueError(f"unknown dataset kind {kind!r} in checkpoint")


def encode(text: str, vocab: list[str] | None) -> list[int]:
    """Text -> token ids under a character vocabulary, or UTF-8 bytes when vocab is None."""
    if vocab is None:
        return list(text.encode("utf-8"))
    lookup = {token: i for i, token in enumerate(vocab)}
    unknown = sorted({ch for ch in text if ch not in lookup})
    if unknown:
        raise ValueError(f"characters not in the vocabulary: {unknown!r}")
    return [lookup[ch] for ch in text]


def decode(ids: torch.Tensor | list[int], vocab: list[str] | None) -> str:
    """Token ids -> text under a character vocabulary, or as UTF-8 bytes when vocab is None."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if vocab is None:
        return bytes(ids).decode("utf-8", errors="replace")
    return "".join(vocab[i] for i in ids)
