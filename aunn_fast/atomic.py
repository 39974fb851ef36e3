"""Files written whole or not at all: a reader (or a crash) never sees half a file, or half a set of files.

A file is written beside its destination under a temporary name ``.NAME.PID.RANDOM.tmp`` and renamed
over it once synced. A process killed mid-write leaves its temporary file behind; the next write of the
same destination removes those whose writer is no longer running. A set of files is written into a
staging directory ``.staging.PID.RANDOM`` and moved into place once all are written.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> None:
    """Call write(tmp_path), which creates that file, then rename it over path, so a reader never sees half a
    file. Temporary files of earlier writes of path whose process died are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    # not tempfile.mkstemp, whose file is mode 0600: write creates tmp with the usual 0666 & ~umask
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    try:
        write(tmp)
        _fsync(tmp)  # the data on disk before the rename, so a crash leaves the old file or the new, whole
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _temporary_pattern(path: Path) -> re.Pattern[str]:
    """Names of path's temporary files: with the writer's pid, or without (written before it was recorded)."""
    return re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.)?[0-9a-f]{{16}}\.tmp")


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own failed writes were removed when they failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OverflowError:
        return False
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files left beside path by writes whose process is gone; returns them."""
    pattern, removed = _temporary_pattern(path), []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        if match and not (match.group(1) and _running(int(match.group(1)))):
            with contextlib.suppress(FileNotFoundError):  # removed by someone else meanwhile
                (path.parent / name).unlink()
                removed.append(path.parent / name)
    return removed


def _fsync(path: Path) -> None:
    """Flush a file's writes to the disk; for a directory (its entries, the rename) only where the OS can."""
    if not path.is_dir():
        fd = os.open(path, os.O_RDONLY)
    elif hasattr(os, "O_DIRECTORY"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
    else:  # Windows opens no directories
        return
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some file systems refuse to sync a directory; the file itself must be synced
            raise
    finally:
        os.close(fd)


def write_file_set(directory: Path, write: Callable[[Path], list[Path]]) -> list[Path]:
    """Call write(staging), which writes files into the empty directory ``staging`` and returns them; then
    move them all into ``directory`` (replacing files of the same names). If write fails, nothing in
    ``directory`` changes. Returns the files' final paths.

    The files are renamed one by one, each atomically: a crash during the renames (microseconds, no
    data written) can leave the new set partly in place, but never a half-written file. Staging
    directories left by killed writers are removed first.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(directory):  # staging directories of writers that were killed
        match = re.fullmatch(r"\.staging\.(\d+)\.[0-9a-f]{16}", name)
        if match and not _running(int(match.group(1))):
            shutil.rmtree(directory / name, ignore_errors=True)
    staging = directory / f".staging.{os.getpid()}.{secrets.token_hex(8)}"
    staging.mkdir()
    try:
        written = write(staging)
        for file in written:
            _fsync(file)
        final = [directory / file.name for file in written]
        for file, target in zip(written, final):
            os.replace(file, target)
        _fsync(directory)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)
