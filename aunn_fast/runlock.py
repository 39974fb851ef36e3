"""One writer per run directory: an advisory lock held while a command writes there.

The lock is ``fcntl.flock`` on ``RUN_DIR/.aunn.lock``, a file that names its holder (pid, host, command,
start time). The kernel releases the lock when its process ends, however it ends, so a lock file left by
a killed process is stale by construction: the next writer locks it and takes it over (and says so).
While a writer lives, a second one is refused with the holder's name. Within one process the lock is
re-entrant (the command line holds it, then :func:`aunn_fast.train.train` asks again).

Where the file system offers no ``flock`` (some network file systems, Windows) the file's pid and host
are checked instead: a live pid on this host, or any other host, refuses; a dead pid on this host is stale.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import RunDirectoryBusy

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".aunn.lock"
_held: set[str] = set()  # run directories this process holds (real paths)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _holder(command: str) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    return (
        f"{holder.get('command', 'a command')} (pid {holder.get('pid')} on host {holder.get('host')}, "
        f"since {holder.get('since')})"
    )


def _read(fd: int) -> dict[str, Any] | None:
    """The holder a lock file names, or None for an empty or unreadable one."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "null")
    except (ValueError, OSError):
        return None
    return holder if isinstance(holder, dict) else None


def _write(fd: int, holder: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)


def _alive_here(holder: dict[str, Any]) -> bool:
    """Whether the holder named is a live process of this host (or of another host, where we cannot tell)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock(path: Path, run_dir: Path, command: str) -> tuple[int, dict[str, Any] | None]:
    """Open and lock path; returns the descriptor and the stale holder it replaced (None if there was none)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            previous = _read(fd)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise RunDirectoryBusy(
                        f"{run_dir} is in use by {_describe(previous)}: one writer at a time "
                        f"(wait for it to end, or use another directory)"
                    ) from None
                except OSError as exc:
                    if exc.errno not in _NO_FLOCK:
                        raise
                    _refuse_live_holder(previous, run_dir)
            else:
                _refuse_live_holder(previous, run_dir)
            try:  # the holder before us may have removed the file between our open and our lock: lock anew
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                _write(fd, _holder(command))
                return fd, _read_stale(previous)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _read_stale(previous: dict[str, Any] | None) -> dict[str, Any] | None:
    return previous if previous and previous.get("pid") != os.getpid() else None


def _refuse_live_holder(holder: dict[str, Any] | None, run_dir: Path) -> None:
    if holder and _alive_here(holder):
        raise RunDirectoryBusy(
            f"{run_dir} is in use by {_describe(holder)}: one writer at a time (if that "
            f"process is gone, remove {run_dir / LOCK_NAME})"
        )


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike[str], command: str) -> Iterator[None]:
    """Hold run_dir's lock for the block: RunDirectoryBusy (a ValueError) at once if another process
    holds it. Creates run_dir if needed; on leaving, the lock file is removed, and so are the
    directories created here if nothing was written into them."""
    run_dir = Path(run_dir)
    created = [p for p in (run_dir, *run_dir.absolute().parents) if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run_dir)
    if key in _held:
        yield
        return
    lock_path = run_dir / LOCK_NAME
    try:
        fd, stale = _lock(lock_path, run_dir, command)
    except BaseException:
        _remove_empty(created)
        raise
    if stale:
        print(
            f"note: took over the lock of {run_dir} left by {_describe(stale)}, which is no longer running",
            file=sys.stderr,
        )
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()  # while still locked: a waiting writer then locks a new file (see _lock)
        os.close(fd)
        _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories this hold created (innermost first) that are still empty."""
    for directory in created:
        try:
            directory.rmdir()
        except OSError:
            return
