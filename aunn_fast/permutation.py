"""A keyed pseudo-random permutation of [0, n), computed on the fly for any n up to 2^63.

An epoch over n indices visits them in the order ``perm(0), perm(1), ..., perm(n-1)``:
position p of the epoch is index ``perm(p)``. Nothing of size n is stored, so an epoch
over 2^63 indices costs what an epoch over 100 does, per index drawn.

The bijection is a Feistel network over k = bit_length(n - 1) bits (the smallest power
of two 2^k >= n), split into a high half of ceil(k/2) bits and a low half of floor(k/2)
bits. Each round replaces one half by itself XOR a keyed hash of the other (alternating
halves, so unequal halves need no swap); every round is invertible, so the network is a
bijection of [0, 2^k). Positions it maps to n or beyond are mapped again ("cycle
walking") until they land below n, which restricts it to a bijection of [0, n); as
2^k <= 2n, a position needs at most 2 passes through the network on average.

All arithmetic is on int64 tensors holding values below 2^32 (a half) or below 2^63 (a
whole), and every product is of a value below 2^32 by a constant below 2^31, so nothing
overflows int64. It runs on any device and gives the same permutation on every one.
"""

from __future__ import annotations

import torch

ROUNDS = 8  # 4 rounds per half; 4 rounds of a balanced Feistel network already make a pseudo-random permutation
MAX_LENGTH = 1 << 63
_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1
_MULTIPLIERS = (0x7FEB352D, 0x31848BAB)  # odd, below 2^31: a 32-bit value times one stays below 2^63


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser of x + the golden-ratio increment: a well-mixed 64-bit hash of a Python int."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def round_keys(seed: int, epoch: int) -> list[int]:
    """The ROUNDS 32-bit round keys of the permutation keyed by (seed, epoch), both ints >= 0."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed} and {epoch}")
    key = _splitmix64(_splitmix64(seed & _MASK64) ^ epoch)
    return [_splitmix64(key + i) & _MASK32 for i in range(ROUNDS)]


def _hash32(x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """int64 [...] values in [0, 2^32), int64 [] key -> int64 [...] keyed hashes in [0, 2^32) (xorshift-multiply).

    In-place on a fresh tensor; the key is a tensor because XOR with a Python int takes a slower path."""
    h = x ^ key
    for multiplier in _MULTIPLIERS:
        h ^= h >> 16
        h *= multiplier
        h &= _MASK32
    h ^= h >> 15
    return h


class IndexPermutation:
    """A bijection of [0, length) keyed by (seed, epoch): ``perm(positions) -> indices``, and its inverse
    ``perm.position(indices) -> positions``.

    ``positions``: int64 [...] in [0, length) on any device; returns int64 [...] in
    [0, length), same device. Positions outside [0, length) are not checked: the
    caller makes sure there are none.
    """

    def __init__(self, length: int, seed: int, epoch: int) -> None:
        if not 1 <= length <= MAX_LENGTH:
            raise ValueError(f"a permutation needs 1 <= length <= 2^63, got {length}")
        self.length, self.seed, self.epoch = length, seed, epoch
        bits = max(1, (length - 1).bit_length())
        self.low_bits = bits // 2
        self.high_mask, self.low_mask = (1 << (bits - self.low_bits)) - 1, (1 << self.low_bits) - 1
        self.keys = round_keys(seed, epoch)
        self.walks = length != 1 << bits  # a power of two is the network's whole domain: nothing to walk
        self._device_keys: dict[torch.device, torch.Tensor] = {}

    def _network(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """The Feistel network (or its inverse): a bijection of [0, 2^bits) on int64 values."""
        if x.device not in self._device_keys:
            self._device_keys[x.device] = torch.tensor(self.keys, dtype=torch.int64, device=x.device)
        keys = self._device_keys[x.device]
        high, low = x >> self.low_bits, x & self.low_mask
        for i in reversed(range(ROUNDS)) if inverse else range(ROUNDS):  # each round undoes itself
            if i % 2 == 0:
                high ^= _hash32(low, keys[i]) & self.high_mask
            else:
                low ^= _hash32(high, keys[i]) & self.low_mask
        return (high << self.low_bits) | low

    def _walk(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        """int64 [...] in [0, length) -> int64 [...] in [0, length): the network, applied again to every value
        it takes outside [0, length) until it is inside."""
        if x.dtype != torch.int64:
            raise TypeError(f"expected int64 positions or indices, got {x.dtype}")
        out = self._network(x.reshape(-1), inverse)
        if self.walks:
            outside = torch.nonzero(out >= self.length).squeeze(1)
            while outside.numel():
                walked = self._network(out[outside], inverse)
                out[outside] = walked
                outside = outside[walked >= self.length]
        return out.reshape(x.shape)

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """int64 [...] positions in the epoch -> int64 [...] the indices seen there."""
        return self._walk(positions, inverse=False)

    def position(self, indices: torch.Tensor) -> torch.Tensor:
        """The inverse: int64 [...] indices in [0, length) -> int64 [...] the positions where the epoch sees them."""
        return self._walk(indices, inverse=True)
