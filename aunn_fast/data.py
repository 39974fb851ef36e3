"""Datasets: a token for every absolute index, on any device.

Every dataset offers ``targets(idx)`` (int64 [...] -> int64 tokens [...], on idx's
device), its ``length`` N (valid indices are 0..N-1), a ``vocab_size``, a ``vocab`` (how
tokens read, see :data:`Vocab`), and ``describe()``, a JSON-able dict that goes into every
checkpoint so the run can be reopened. Specs on the command line:

    toy[:CHUNKS[:SEED]]   the seed's sequence of `|aaa`, `|bbb`, `|ccc` chunks (default 100000 chunks)
    text:PATH             UTF-8 text, one token per character, vocabulary built from the file
    bytes:PATH            raw bytes, vocabulary 256, memory-mapped (files larger than RAM work)
    tokens:PATH           token ids (e.g. BPE), memory-mapped: a 1-D integer .npy, or a .bin of
                          little-endian uint16 (nanoGPT's train.bin); vocabulary: the largest id + 1
    digits[:ORDER]        scikit-learn's 1,797 8x8 handwritten digits (optional extra `[digits]`), grey
                          levels 0-16 as tokens, 64 pixels per image in row-major order, images end to end;
                          the last DIGITS_HELD_OUT images are held out of training (for inpainting); ORDER
                          (DIGIT_ORDERS) is the training images' order: scikit-learn's (default), by label,
                          or a similarity tree (see :func:`similarity_tree_order`)

A file dataset's description carries the file's SHA-256, so a checkpoint reopens the data only
if the file is unchanged (an edit that keeps the length included).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import MissingDependencyError, MissingFileError, UserInputError, UserTypeError

# A file's token ids read on a GPU are copied there once (in the narrowest dtype, in COPY_CHUNK_BYTES
# pieces) if they take at most DEVICE_COPY_FRACTION of the free device memory; larger ones are gathered
# on the host (from the memory map), which costs a host round trip per batch.
DEVICE_COPY_FRACTION = 0.25
COPY_CHUNK_BYTES = 1 << 28
TEXT_CHUNK_CHARS = 1 << 24  # characters encoded at a time
FINGERPRINT_KEYS = ("sha256", "size", "mtime_ns")  # what a file's description adds to identify its content
SCAN_CHUNK_TOKENS = 1 << 26  # token ids checked at a time when a token file is opened

Vocab = list[str] | int | None
"""How a dataset's tokens read: a list of single characters (text and toy data), None for raw bytes
(shown as UTF-8), or an int V for token ids 0..V-1 with no text form (shown as numbers)."""


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

    MAX_CHUNKS = 2**61  # 4 indices each: the int64 indices 0 .. 2**63-1
    MAX_SEED = 2**63 - 1  # an int64

    def __init__(self, chunks: int = 100_000, seed: int = 0) -> None:
        for name, value in (("chunks", chunks), ("seed", seed)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserTypeError(f"toy data's {name} must be an int, got {type(value).__name__}")
        if not 1 <= chunks <= self.MAX_CHUNKS:
            raise UserInputError(
                f"toy data needs at least one chunk and at most 2**61 (4 indices each, within int64), got {chunks}"
            )
        if not 0 <= seed <= self.MAX_SEED:
            raise UserInputError(f"toy data's seed must be in 0..2**63-1, got {seed}")
        self.chunks, self.seed = chunks, seed
        self.length = 4 * chunks
        self._tables: dict[torch.device, torch.Tensor] = {}

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens."""
        return len(self.vocab)

    def letters(self, chunk: torch.Tensor) -> torch.Tensor:
        """int64 chunk numbers -> token id (1, 2 or 3) of each chunk's letter."""
        key = mix64(chunk.to(torch.int64) + mix64(torch.full_like(chunk, self.seed, dtype=torch.int64)))
        return 1 + _shift_right(key, 1) % 3

    TABLE_MAX_LENGTH = 1 << 22  # data up to this length keeps its tokens in a table per device (32 MiB at most)

    def _tokens(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.where(idx % 4 == 0, torch.zeros_like(idx), self.letters(idx // 4))

    def targets(self, idx: torch.Tensor) -> torch.Tensor:
        """int64 indices [...] (any, even past the data) -> int64 tokens [...] on idx's device.

        Batches inside small data (a training step's) are read from a table of the data's tokens, computed once:
        the hash costs ~20 tensor operations per call."""
        idx = idx.to(torch.int64)
        if self.length > self.TABLE_MAX_LENGTH or idx.numel() == 0 or idx.min() < 0 or idx.max() >= self.length:
            return self._tokens(idx)
        if idx.device not in self._tables:
            self._tables[idx.device] = self._tokens(torch.arange(self.length, device=idx.device))
        return self._tables[idx.device][idx]

    def describe(self) -> dict[str, Any]:
        """JSON-able description (kind, chunks, seed, length) that :func:`data_from_description` reopens."""
        return {"kind": "toy", "chunks": self.chunks, "seed": self.seed, "length": self.length}


def uniform_indices(length: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """int64 [n] drawn uniformly from 0 .. length-1, on the generator's device; length up to 2**63 (then
    every int64 >= 0, where randint's exclusive bound would overflow)."""
    if length == 1 << 63:
        return torch.empty(n, dtype=torch.int64, device=generator.device).random_(generator=generator)
    return torch.randint(0, length, (n,), generator=generator, device=generator.device)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class FileData:
    """What text and bytes datasets share: a file, its length in tokens, its fingerprint (the SHA-256
    of its bytes, with the size and modification time it had when opened)."""

    kind = ""
    length: int

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        stat = self.path.stat()
        self.size, self.mtime_ns = stat.st_size, stat.st_mtime_ns
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        """The file's SHA-256, computed on first use (reading the file: about a second per GB) and kept."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def describe(self) -> dict[str, Any]:
        """JSON-able description (kind, absolute path, length, sha256, size, mtime_ns) that
        :func:`data_from_description` reopens."""
        return {
            "kind": self.kind,
            "path": str(self.path.resolve()),
            "length": self.length,
            "sha256": self.sha256,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
        }


def smallest_token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest integer dtype that holds token ids 0..vocab_size-1."""
    for dtype in (np.uint8, np.int16, np.int32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise UserInputError(f"vocabulary of {vocab_size} tokens is too large")


def _codepoint_chunks(text: str):
    """The Unicode code points of text as uint32 arrays of at most TEXT_CHUNK_CHARS each, so that the
    temporaries stay small next to the text itself."""
    for start in range(0, len(text), TEXT_CHUNK_CHARS):
        yield np.frombuffer(text[start : start + TEXT_CHUNK_CHARS].encode("utf-32-le"), dtype="<u4")


def characters_of(text: str) -> list[str]:
    """The distinct characters of text, sorted (``sorted(set(text))``, vectorised)."""
    counts = np.zeros(0, dtype=np.int64)
    for codepoints in _codepoint_chunks(text):
        chunk_counts = np.bincount(codepoints)
        counts = np.pad(counts, (0, max(0, chunk_counts.size - counts.size)))
        counts[: chunk_counts.size] += chunk_counts
    return [chr(c) for c in np.flatnonzero(counts).tolist()]


def encode_characters(text: str, vocab: list[str]) -> np.ndarray:
    """Token ids of every character of text under a vocabulary of single characters, vectorised, in
    the narrowest integer dtype that holds them."""
    vocab_codepoints = np.array([ord(ch) for ch in vocab], dtype=np.int64)
    lookup = np.full(0x110000, -1, dtype=np.int32)  # every Unicode code point
    lookup[vocab_codepoints] = np.arange(len(vocab), dtype=np.int32)
    ids = np.empty(len(text), dtype=smallest_token_dtype(len(vocab)))
    start = 0
    for codepoints in _codepoint_chunks(text):
        chunk_ids = lookup[codepoints]
        if (chunk_ids < 0).any():
            unknown = sorted({chr(c) for c in np.unique(codepoints[chunk_ids < 0]).tolist()})
            raise UserInputError(f"characters not in the vocabulary: {unknown!r}")
        ids[start : start + codepoints.size] = chunk_ids
        start += codepoints.size
    return ids


_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int16): torch.int16, np.dtype(np.int32): torch.int32}


class TokenArray(FileData):
    """A file's token ids as a NumPy ``array`` of any integer dtype: memory-mapped (bytes and token files,
    so files larger than RAM work) or encoded in memory (text). Read on a GPU, ids that fit (see
    DEVICE_COPY_FRACTION) are copied there once, in the narrowest dtype that holds the vocabulary, so that
    batches need no host round trip; CPU indices read the array."""

    array: np.ndarray
    vocab_size: int

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._copy_device: torch.device | None = None
        self._copy: torch.Tensor | None = None

    def fits_on(self, device: torch.device) -> bool:
        """Whether the ids are to be copied to the GPU device: whether it has room for them."""
        free, _ = torch.cuda.mem_get_info(device)
        return self.length * smallest_token_dtype(self.vocab_size).itemsize <= DEVICE_COPY_FRACTION * free

    def _device_copy(self, device: torch.device) -> torch.Tensor | None:
        """The ids as a tensor on the GPU device (copied in chunks on first use; a copy on another GPU is
        dropped), or None where they do not fit."""
        if self._copy_device != device:
            self._copy_device, self._copy = device, None
            if self.fits_on(device):
                dtype = smallest_token_dtype(self.vocab_size)
                self._copy = torch.empty(self.length, dtype=_TORCH_DTYPES[dtype], device=device)
                step = COPY_CHUNK_BYTES // dtype.itemsize
                for start in range(0, self.length, step):
                    chunk = self.array[start : start + step].astype(dtype)
                    self._copy[start : start + chunk.size].copy_(torch.from_numpy(chunk))
        return self._copy

    def targets(self, idx: torch.Tensor) -> torch.Tensor:
        """int64 indices [...] in 0..length-1 -> int64 token ids [...] on idx's device."""
        copy = self._device_copy(idx.device) if idx.device.type == "cuda" else None  # CPU: keep a GPU copy
        if copy is not None:
            return copy[idx].long()
        picked = self.array[idx.detach().cpu().numpy()]
        return torch.from_numpy(picked.astype(np.int64)).to(idx.device)


class TextData(TokenArray):
    """UTF-8 text, one token per character; the vocabulary is the file's sorted characters (or the
    given one, e.g. a checkpoint's). Tokens are kept in memory, in the narrowest integer dtype."""

    kind = "text"

    def __init__(self, path: str | Path, vocab: list[str] | None = None) -> None:
        super().__init__(path)
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UserInputError(f"{self.path} is not UTF-8 text ({exc}); bytes:{self.path} reads any file") from None
        if not text:
            raise UserInputError(f"{self.path} is empty")
        if vocab is None:
            vocab = characters_of(text)
        if any(len(token) != 1 for token in vocab):
            raise UserInputError("a text dataset's vocabulary must be single characters")
        self.vocab = vocab
        self.array = encode_characters(text, vocab)
        self.length = len(text)

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens."""
        return len(self.vocab)


class BytesData(TokenArray):
    """Raw bytes of a file; vocabulary 256 (decoded as UTF-8 for display)."""

    kind = "bytes"
    vocab = None
    vocab_size = 256

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.length = self.size
        if self.length == 0:
            raise UserInputError(f"{self.path} is empty")
        self.array = np.memmap(self.path, dtype=np.uint8, mode="r")


class TokensData(TokenArray):
    """Token ids of an already tokenised corpus: a 1-D integer ``.npy`` file, or a ``.bin`` of little-endian
    uint16 (nanoGPT's layout). The vocabulary is ids 0..V-1 with V the largest id + 1 (at least 2), found by
    one pass over the file, unless given (a checkpoint's, for an unchanged file)."""

    kind = "tokens"

    def __init__(self, path: str | Path, vocab_size: int | None = None) -> None:
        super().__init__(path)
        self.array = self._open(self.path)
        self.length = self.array.size
        if self.length == 0:
            raise UserInputError(f"{self.path} holds no tokens")
        self.vocab_size = self._scan() if vocab_size is None else vocab_size
        self.vocab = self.vocab_size

    @staticmethod
    def _open(path: Path) -> np.ndarray:
        if path.suffix == ".bin":
            if path.stat().st_size == 0:
                raise UserInputError(f"{path} holds no tokens")
            if path.stat().st_size % 2:
                raise UserInputError(f"{path}: a .bin token file holds uint16 ids, but its size is odd (truncated?)")
            return np.memmap(path, dtype="<u2", mode="r")
        if path.suffix != ".npy":
            raise UserInputError(f"{path}: a token file is a .npy array or a .bin of uint16 ids")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:  # numpy's own message: a truncated file, a bad header, an object array
            raise UserInputError(f"{path} is not a readable .npy token array: {exc}") from None
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise UserInputError(f"{path}: token ids must be a 1-D integer array, got {array.dtype} {array.shape}")
        return array

    def _scan(self) -> int:
        """The vocabulary size the ids need; a ValueError for a negative id or one too large to be a token."""
        low, high = 0, 0
        for start in range(0, self.length, SCAN_CHUNK_TOKENS):
            chunk = self.array[start : start + SCAN_CHUNK_TOKENS]
            low, high = min(low, int(chunk.min())), max(high, int(chunk.max()))
        if low < 0:
            raise UserInputError(f"{self.path} holds a negative token id ({low})")
        if high >= np.iinfo(np.int32).max:
            raise UserInputError(f"{self.path} holds a token id too large for a vocabulary ({high})")
        return max(2, high + 1)

    def describe(self) -> dict[str, Any]:
        """:meth:`FileData.describe` plus the vocabulary size."""
        return {**super().describe(), "vocab_size": self.vocab_size}


DIGITS_HELD_OUT = 97  # the last images of scikit-learn's digits, kept out of training
DIGIT_SIDE = 8
DIGIT_PIXELS = DIGIT_SIDE * DIGIT_SIDE
DIGIT_LEVELS = 17  # grey levels 0..16


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (shipped inside its package: no download): uint8 images [1797, 8, 8] of grey
    levels 0..16, and int64 labels [1797]. A MissingDependencyError (an ImportError) without
    scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingDependencyError("the digits data needs scikit-learn: pip install 'aunn_fast[digits]'") from None
    bunch = load_digits()
    return bunch.images.astype(np.uint8), bunch.target.astype(np.int64)


DIGIT_ORDERS = ("scikit", "label", "tree")


def similarity_tree_order(images: np.ndarray) -> np.ndarray:
    """int64 [n]: an order of the images (flattened [n, ...]) in which every bit of an image's slot number
    splits the images alike in the pixels. Slots 0 .. n-1 fill a binary tree of 2^ceil(log2 n) slots from
    the left: a node of 2^k slots holding m images gives its left child the min(m, 2^(k-1)) images lowest
    along their first principal direction (signed so that its largest component is positive), the right
    child the rest, and so on down to single images. So
    the slot's highest bit tells the images apart along the widest direction of the whole set, and each
    lower bit along the widest direction of the images that share the bits above it."""
    pixels = images.reshape(len(images), -1).astype(np.float64)

    def order(members: np.ndarray, slots: int) -> list[np.ndarray]:
        if len(members) <= 1:
            return [members]
        half = slots // 2
        if len(members) <= half:  # the right child is empty: this bit is 0 for every member
            return order(members, half)
        centred = pixels[members] - pixels[members].mean(axis=0)
        direction = np.linalg.svd(centred, full_matrices=False)[2][0]
        direction *= np.sign(direction[np.argmax(np.abs(direction))])  # the SVD's sign varies with the LAPACK build
        ranked = members[np.argsort(centred @ direction, kind="stable")]
        return order(ranked[:half], half) + order(ranked[half:], half)

    slots = 1 << max(0, len(images) - 1).bit_length()
    return np.concatenate(order(np.arange(len(images)), slots)).astype(np.int64)


def digit_order(images: np.ndarray, labels: np.ndarray, name: str) -> np.ndarray:
    """int64 [n]: the training images' order called ``name`` (one of DIGIT_ORDERS): scikit-learn's own,
    by label (stable: scikit-learn's order within a label), or :func:`similarity_tree_order`."""
    if name == "scikit":
        return np.arange(len(images), dtype=np.int64)
    if name == "label":
        return np.argsort(labels, kind="stable").astype(np.int64)
    if name == "tree":
        return similarity_tree_order(images)
    raise UserInputError(f"unknown digits order {name!r}; choose from {', '.join(DIGIT_ORDERS)}")


class DigitsData:
    """scikit-learn's 8x8 handwritten digits as one token sequence: training image i's pixel (r, c) is token
    ``64 i + 8 r + c``, its grey level 0..16 (vocabulary ``0``..``9``, ``a``..``g``). The training images
    stand in the ``order`` of DIGIT_ORDERS (:func:`digit_order`); ``train_images`` and ``train_labels`` are
    in that order. The last ``held_out`` images of scikit-learn's are not part of the sequence; they sit
    where the sequence would continue (image ``images + k`` at indices ``64 (images + k)`` ..), and are kept
    for inpainting."""

    kind = "digits"
    vocab = [format(level, "x") if level < 16 else "g" for level in range(DIGIT_LEVELS)]

    def __init__(self, held_out: int = DIGITS_HELD_OUT, order: str = "scikit") -> None:
        all_images, all_labels = load_sklearn_digits()
        if not 0 <= held_out < len(all_images):
            raise UserInputError(f"held_out must be in 0..{len(all_images) - 1}, got {held_out}")
        self.held_out, self.order = held_out, order
        self.images = len(all_images) - held_out
        self.held_out_images, self.held_out_labels = all_images[self.images :], all_labels[self.images :]
        placed = digit_order(all_images[: self.images], all_labels[: self.images], order)
        self.train_images, self.train_labels = all_images[placed], all_labels[placed]
        self.array = self.train_images.reshape(-1)
        self.length = self.array.size

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens: the grey levels."""
        return DIGIT_LEVELS

    def image_start(self, image: int) -> int:
        """The index of image ``image``'s first pixel (past the data for a held-out image)."""
        return image * DIGIT_PIXELS

    def targets(self, idx: torch.Tensor) -> torch.Tensor:
        """int64 indices [...] in 0..length-1 -> int64 grey levels [...] on idx's device."""
        picked = self.array[idx.detach().cpu().numpy()]
        return torch.from_numpy(picked.astype(np.int64)).to(idx.device)

    def describe(self) -> dict[str, Any]:
        """JSON-able description (kind, held_out, order, length) that :func:`data_from_description` reopens."""
        return {"kind": self.kind, "held_out": self.held_out, "order": self.order, "length": self.length}


class HeldOutTail:
    """Any dataset but its last ``held_out`` tokens: training sees indices 0 .. length-1, and the tokens at
    length .. length+held_out-1 (where generation begins) are kept to measure what extrapolation predicts."""

    kind = "held_out_tail"

    def __init__(self, data: ToyData | TextData | BytesData | TokensData | DigitsData, held_out: int) -> None:
        if not 0 < held_out < data.length:
            raise UserInputError(
                f"the tokens held out must be 1 .. {data.length - 1} (the data's length - 1), got {held_out}"
            )
        self.data, self.held_out = data, held_out
        self.length = data.length - held_out
        self.vocab, self.vocab_size = data.vocab, data.vocab_size

    def targets(self, idx: torch.Tensor) -> torch.Tensor:
        """int64 indices [...] -> int64 tokens [...] on idx's device; the held-out indices read too."""
        return self.data.targets(idx)

    def describe(self) -> dict[str, Any]:
        """JSON-able description (kind, held_out, training length, the whole data's description) that
        :func:`data_from_description` reopens."""
        return {"kind": self.kind, "held_out": self.held_out, "length": self.length, "data": self.data.describe()}


Dataset = ToyData | TextData | BytesData | TokensData | DigitsData | HeldOutTail
FILE_DATASETS = {"text": TextData, "bytes": BytesData, "tokens": TokensData}


def load_data(spec: str) -> Dataset:
    """Open a dataset from its command-line spec (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "toy":  # an empty field keeps its default: toy::7 is the default chunks with seed 7
        fields = rest.split(":") if rest else []
        if len(fields) > 2 or not all(f.isascii() and f.isdigit() for f in fields if f):
            raise UserInputError(f"toy spec is toy[:CHUNKS[:SEED]] with whole numbers, got {spec!r}")
        return ToyData(**{name: int(f) for name, f in zip(("chunks", "seed"), fields) if f})
    if kind == "digits":
        if rest not in ("", *DIGIT_ORDERS):
            raise UserInputError(
                f"the digits spec is digits[:ORDER], ORDER one of {', '.join(DIGIT_ORDERS)}; got {spec!r}"
            )
        return DigitsData(order=rest or "scikit")
    if kind in FILE_DATASETS:
        if not rest:
            raise UserInputError(f"{kind} spec needs a path: {kind}:PATH")
        if not Path(rest).is_file():
            raise MissingFileError(f"no such data file: {rest}")
        return FILE_DATASETS[kind](rest)
    raise UserInputError(
        f"unknown data spec {spec!r}; use toy[:CHUNKS[:SEED]], text:PATH, bytes:PATH, tokens:PATH or digits[:ORDER]"
    )


def data_from_description(description: dict[str, Any], vocab: Vocab = None) -> Dataset:
    """Reopen the dataset a checkpoint was trained on; a ValueError if its file changed since.

    A file whose size and modification time are those recorded keeps its recorded SHA-256 (the rule
    make and git use), so a huge file is not read again; any other file is hashed and must match.
    Checkpoints without a SHA-256 (written before it was recorded) are checked by length alone.
    """
    kind = description["kind"]
    if kind == "toy":
        return ToyData(description["chunks"], description["seed"])
    if kind == "held_out_tail":
        return HeldOutTail(data_from_description(description["data"], vocab), description["held_out"])
    if kind == "digits":
        data = DigitsData(description["held_out"], description.get("order", "scikit"))  # older: scikit-learn's
        if data.length != description["length"]:
            raise UserInputError(
                f"scikit-learn's digits have changed since the checkpoint was saved "
                f"(were {description['length']} training tokens, now {data.length})"
            )
        return data
    if kind not in FILE_DATASETS:
        raise UserInputError(f"unknown dataset kind {kind!r} in checkpoint")
    path = Path(description["path"])
    if not path.is_file():
        raise MissingFileError(f"no such data file: {path}")
    recorded = description.get("sha256")
    stat = path.stat()
    untouched = (description.get("size"), description.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns)
    digest = recorded if recorded is not None and untouched else file_sha256(path)
    if recorded is not None and digest != recorded:
        raise UserInputError(
            f"{path} changed since the checkpoint was saved (sha256 was {recorded[:12]}..., now {digest[:12]}...)"
        )
    if kind == "text":
        data = TextData(path, vocab)
    elif kind == "tokens":
        data = TokensData(path, description["vocab_size"])
    else:
        data = BytesData(path)
    if data.length != description["length"]:
        raise UserInputError(
            f"{path} changed since the checkpoint was saved (was {description['length']} tokens, now {data.length})"
        )
    data._sha256 = digest
    return data


def encode(text: str, vocab: Vocab) -> list[int]:
    """Text -> token ids under a :data:`Vocab`: characters, UTF-8 bytes (None), or for an int V the ids
    themselves, written as numbers separated by spaces or commas."""
    if vocab is None:
        return list(text.encode("utf-8"))
    if isinstance(vocab, int):
        words = text.replace(",", " ").split()
        if not all(w.isascii() and w.isdigit() for w in words) or any(int(w) >= vocab for w in words):
            raise UserInputError(f"expected token ids in 0..{vocab - 1} separated by spaces, got {text!r}")
        return [int(w) for w in words]
    lookup = {token: i for i, token in enumerate(vocab)}
    unknown = sorted({ch for ch in text if ch not in lookup})
    if unknown:
        raise UserInputError(f"characters not in the vocabulary: {unknown!r}")
    return [lookup[ch] for ch in text]


def decode(ids: torch.Tensor | list[int], vocab: Vocab) -> str:
    """Token ids -> text under a :data:`Vocab` (for an int V: the ids as numbers separated by spaces)."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if vocab is None:
        return bytes(ids).decode("utf-8", errors="replace")
    if isinstance(vocab, int):
        return " ".join(map(str, ids))
    return "".join(vocab[i] for i in ids)
