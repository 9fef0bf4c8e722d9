"""Content-addressed artifact store: blobs named by their sha256, behind a small interface."""

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from cloud.exceptions import ArtifactStoreError

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 16


def check_sha256(sha256: str) -> str:
    """Return `sha256` if it is 64 lowercase hex digits; anything else (a path, `..`) is refused."""
    if not SHA256_PATTERN.fullmatch(sha256):
        raise ArtifactStoreError(f"not a sha256 address: {sha256[:80]!r}")
    return sha256


class ArtifactStore(Protocol):
    """Where model blobs live. Local files now; an object store can implement the same four methods."""

    def put(self, data: bytes) -> str:
        """Store `data`; return its sha256. Storing the same bytes twice is a no-op."""
        ...

    def exists(self, sha256: str) -> bool:
        """Whether a blob with this address is stored."""
        ...

    def open_chunks(self, sha256: str) -> Iterator[bytes]:
        """The blob's bytes in chunks, for streaming a download."""
        ...

    def get(self, sha256: str) -> bytes:
        """The whole blob, verified against its address."""
        ...


class LocalArtifactStore:
    """Blobs as files `<root>/<aa>/<sha256>`, written atomically, read back verified."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._path(sha256)
        if path.exists() and self._intact(path, sha256):
            return sha256
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file in the same directory, then rename: a reader never sees half a blob.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha256

    @staticmethod
    def _intact(path: Path, sha256: str) -> bool:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest() == sha256

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def size(self, sha256: str) -> int:
        """The stored blob's size in bytes."""
        try:
            return self._path(sha256).stat().st_size
        except FileNotFoundError:
            raise ArtifactStoreError(f"artifact {sha256} is not stored") from None

    def open_chunks(self, sha256: str) -> Iterator[bytes]:
        path = self._path(sha256)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise ArtifactStoreError(f"artifact {sha256} is not stored") from None
        with handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    def get(self, sha256: str) -> bytes:
        data = b"".join(self.open_chunks(sha256))
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ArtifactStoreError(f"artifact {sha256} is corrupt on disk")
        return data
