"""Secret-bearing files are owner-only: the cloud makes them so and refuses, at start-up, to use one that
others can read (like ssh with a private key). The registry holds credential hashes, knowledge reports
and the audit log; the key directory the signing keys."""

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from cloud.exceptions import InsecureFileError


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) owner-only (0700); an existing directory is left as it is."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty and owner-only (0600) unless it exists; SQLite gives its -wal and -shm files
    the mode of the database file."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to the new file `path`, owner-only (0600) from its creation; FileExistsError if it
    exists (a key is never overwritten)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Hold the exclusive lock of `directory` (its `.lock` file): several processes starting on a fresh
    key directory make its keys once."""
    with (directory / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_private(path: Path, what: str) -> None:
    """Raise InsecureFileError if `path` (a file or a directory) is open to group or others, or if its
    directory lets others replace it. A missing path is not checked."""
    try:
        info = path.stat()
        parent = path.parent.stat()
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        fix = "700" if stat.S_ISDIR(info.st_mode) else "600"
        raise InsecureFileError(f"{what} {path} is open to others (mode {mode:04o}): chmod {fix} {path}")
    if stat.S_IMODE(parent.st_mode) & (stat.S_IWGRP | stat.S_IWOTH) and not parent.st_mode & stat.S_ISVTX:
        raise InsecureFileError(
            f"{what} {path} lies in {path.parent}, which others may write to (mode "
            f"{stat.S_IMODE(parent.st_mode):04o}): chmod go-w {path.parent}"
        )


def check_registry_file(database: Path) -> None:
    """The SQLite registry and its write-ahead log are owner-only."""
    for suffix in ("", "-wal", "-shm"):
        check_private(database.with_name(database.name + suffix), "the registry")
