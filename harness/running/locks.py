"""Locks the kernel releases when their holder dies: one runner per sweep, one sweep per machine.

``fcntl.flock`` locks belong to the open file description, so a runner killed with SIGKILL (or whose PID is
later reused by an unrelated process) never leaves a lock that blocks the next run. The lock files themselves
stay in place; they hold the holder's PID and sweep only as information for the message a second runner gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path


class Busy(RuntimeError):
    """The lock is held by a live process (its description is in the message)."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    if not isinstance(info, dict):
        return "another process"
    return f"process {info.get('pid', '?')} ({info.get('what', '?')})"


@contextlib.contextmanager
def hold(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the ``with`` block; raise :class:`Busy` at once if it is held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a lock file replaced by a link (a damaged or hostile results folder) is refused (ELOOP, an OSError
    # the commands report), never followed: the holder's note is written into the lock file
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"{path} is held by {_holder(path)}") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "what": what}).encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def sweep_lock(sweep_dir: Path) -> contextlib.AbstractContextManager[None]:
    """One runner per sweep directory."""
    return hold(Path(sweep_dir) / "sweep.lock", f"running {sweep_dir}")


def machine_lock(lock_dir: Path, sweep_dir: Path, what: str | None = None) -> contextlib.AbstractContextManager[None]:
    """One measuring sweep per machine: a second sweep would measure the first one's load. ``what``: how the
    holder is described to a second runner (default: ``running <sweep_dir>``)."""
    return hold(Path(lock_dir) / "machine.lock", what or f"running {sweep_dir}")

