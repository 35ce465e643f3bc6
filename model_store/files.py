"""File helpers every stage shares: writes that never leave a half-written file behind (a temp
file beside the target, then a rename), and content hashes."""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temp file for writing; on success it replaces ``path`` in one rename, on error it is removed.

    A killed process leaves at most a dot-prefixed ``.name.PID.tmp`` file, never a truncated ``path``;
    the next write to ``path`` removes the temp files of processes that are gone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temp_files(folder: str | os.PathLike, name: str | None = None) -> None:
    """Delete the ``.{name}.PID.tmp`` files in ``folder`` (of any name when ``name`` is None) whose PID
    is no running process: left by a SIGKILL or power cut.

    A live process's temp file is never touched. A process of another PID namespace writing to the
    same folder (a container sharing a volume) looks dead from here; its write would then fail at
    the rename, loudly, instead of leaving a wrong file.
    """
    pattern = re.compile(rf"\.{re.escape(name) if name else '.+'}\.([0-9]+)\.tmp")
    for sibling in Path(folder).iterdir():
        match = pattern.fullmatch(sibling.name)
        if match and _process_is_gone(int(match[1])):
            with suppress(OSError):  # another user's file in a shared folder: theirs to clean
                sibling.unlink()


def _process_is_gone(pid: int) -> bool:
    """True only when no process has this PID; any doubt keeps the file."""
    if not 0 < pid < 2**31:  # os.kill(0, ...) would ask about our whole process group
        return False
    try:
        os.kill(pid, 0)  # signal 0: checks the PID, delivers nothing
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
