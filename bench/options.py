"""argparse types shared by the benchmark's command lines (run, profile_step, kernel_variants, compile_check)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection
from pathlib import Path

_SUFFIXES = {"K": 1 << 10, "M": 1 << 20}


def comma_separated(text: str) -> list[str]:
    """ "a, b,,c" -> ["a", "b", "c"]."""
    return [part.strip() for part in text.split(",") if part.strip()]


def names_from(known: Collection[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of ``known`` (looked up when parsing)."""

    def parse(text: str) -> list[str]:
        names = comma_separated(text)
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown) or repr(text)}; choose from {', '.join(known)}"
            )
        return names

    return parse


def out_dir(text: str) -> Path:
    """An argparse type: an output folder, which may exist, but not as a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return path


def parse_sizes(text: str) -> tuple[int, ...]:
    """ "1,2048,64K,1M" -> (1, 2048, 65536, 1048576)."""
    sizes = []
    for part in comma_separated(text):
        scale = _SUFFIXES.get(part[-1].upper(), 1)
        digits = part[:-1] if scale > 1 else part
        if not digits.isdigit() or int(digits) < 1:
            raise argparse.ArgumentTypeError(f"batch sizes are integers >= 1 (K and M suffixes allowed), got {part!r}")
        sizes.append(int(digits) * scale)
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected batch sizes such as 2048,64K,1M, got {text!r}")
    return tuple(sizes)


def counts(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1."""
    parts = comma_separated(text)
    if not parts or not all(p.isascii() and p.isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"expected integers >= 1 separated by commas, got {text!r}")
    return [int(p) for p in parts]
