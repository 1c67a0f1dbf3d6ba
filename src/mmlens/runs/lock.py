"""An exclusive lock on a run folder, so two processes never write one study at the same time.

The lock is an advisory `flock` on a small file inside the folder, taken before anything is read
or deleted. The kernel drops it when its holder exits, however it exits (SIGKILL included), so a
lock left by a killed run never blocks the next one; the file itself only names the last holder
(pid, host, start time, command) for the message a second process gets.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from ..errors import RunFolderError
from .disk_errors import disk_errors

LOCK_NAME = ".mmlens.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not protected against a second process
    fcntl = None


class RunLock:
    """Hold with `with RunLock(folder):` or `acquire()` / `release()`; not reentrant."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        with disk_errors(self.folder, "taking the folder's lock"):
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunFolderError(
                    f"{self.folder} is in use by another mmlens process ({self.holder()}). Wait for it to finish, "
                    "or stop it (a stopped or killed process releases the folder by itself), or pick another --out"
                ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500]}
        try:
            with disk_errors(self.folder, "taking the folder's lock"):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(holder).encode(), 0)
        except BaseException:
            os.close(fd)  # closing drops the flock too
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def holder(self) -> str:
        """Who holds (or last held) the lock, in words."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "holder unknown"
        if not info:
            return "holder unknown"
        return f"pid {info.get('pid')} on {info.get('host')}: {info.get('command')}"

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["LOCK_NAME", "RunLock"]
