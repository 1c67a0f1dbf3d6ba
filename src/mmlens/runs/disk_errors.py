"""A full disk or a folder that cannot be written, said in words: where, and what to do.

Writes to a run folder happen inside `disk_errors(folder)`; an `OSError` that means "no space"
(ENOSPC, EDQUOT) or "not writable" (EACCES, EPERM, EROFS) becomes a `RunFolderError` naming the
folder, the file and the remedy. Nothing half-written counts as done (files are renamed into
place only when whole, a stage only when its record is), so the same command resumes.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import RunFolderError

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def disk_problem(error: OSError, folder: Path, doing: str = "writing") -> RunFolderError | None:
    """The `RunFolderError` for a full disk or an unwritable folder, else None."""
    where = f" ({error.filename})" if error.filename else ""
    if error.errno in NO_SPACE:
        return RunFolderError(
            f"{folder}: no space left on its disk while {doing}{where}. Nothing half-written was kept or counted as "
            "done. Free some space (or pick an --out on a disk with room) and rerun the same command: finished "
            "stages are kept.")
    if error.errno in NOT_WRITABLE:
        return RunFolderError(
            f"{folder} cannot be written ({error.strerror}{where}) while {doing}. Make the folder writable, or pick "
            "a writable --out, and rerun the command.")
    return None


@contextmanager
def disk_errors(folder: Path, doing: str = "writing") -> Iterator[None]:
    try:
        yield
    except OSError as error:
        problem = disk_problem(error, folder, doing)
        if problem is None:
            raise
        raise problem from None


__all__ = ["NOT_WRITABLE", "NO_SPACE", "disk_errors", "disk_problem"]
