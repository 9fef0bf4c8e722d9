"""LocalArtifactStore: content addressing, atomic writes, verified reads, refused addresses, streaming."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cloud.artifacts import CHUNK, LocalArtifactStore, check_sha256
from cloud.exceptions import ArtifactStoreError

BLOB = b"an int8 flatbuffer" * 1000
SHA = hashlib.sha256(BLOB).hexdigest()
BAD_ADDRESSES = [
    "../x",
    SHA.upper(),
    SHA[:63],
    SHA + "0",
    "",
    f"{SHA[:2]}/{SHA}",
    f"../{SHA}",
    f"/etc/{SHA}",
    SHA + "\n",
    SHA[:60] + "abcg",
]


def files_under(root: Path) -> list[Path]:
    """Every file below `root`, hidden ones included."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_then_get_round_trips(tmp_path: Path) -> None:
    # Prepare
    store = LocalArtifactStore(tmp_path / "store")

    # Execute
    sha256 = store.put(BLOB)

    # Assert
    assert sha256 == SHA
    assert store.exists(SHA)
    assert store.size(SHA) == len(BLOB)
    assert store.get(SHA) == BLOB
    assert files_under(tmp_path / "store") == [tmp_path / "store" / SHA[:2] / SHA]


def test_put_is_idempotent(tmp_path: Path) -> None:
    # Prepare
    store = LocalArtifactStore(tmp_path)
    store.put(BLOB)
    before = (tmp_path / SHA[:2] / SHA).stat()

    # Execute
    again = store.put(BLOB)

    # Assert
    after = (tmp_path / SHA[:2] / SHA).stat()
    assert again == SHA
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(files_under(tmp_path)) == 1


def test_an_empty_blob_is_a_blob(tmp_path: Path) -> None:
    # Prepare
    store = LocalArtifactStore(tmp_path)

    # Execute
    sha256 = store.put(b"")

    # Assert
    assert sha256 == hashlib.sha256(b"").hexdigest()
    assert store.get(sha256) == b""
    assert list(store.open_chunks(sha256)) == []


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_an_address_that_is_not_a_sha256_is_refused(tmp_path: Path, address: str) -> None:
    # Prepare
    store = LocalArtifactStore(tmp_path / "store")
    (tmp_path / "x").write_bytes(b"outside the store")

    # Execute / Assert
    with pytest.raises(ArtifactStoreError, match="not a sha256 address"):
        check_sha256(address)
    with pytest.raises(ArtifactStoreError):
        store.exists(address)
    with pytest.raises(ArtifactStoreError):
        store.get(address)
    with pytest.raises(ArtifactStoreError):
        store.size(address)
    with pytest.raises(ArtifactStoreError):
        next(store.open_chunks(address))


def test_a_valid_address_is_returned_unchanged() -> None:
    # Execute / Assert
    assert check_sha256(SHA) == SHA


def test_a_missing_blob_is_an_error_not_a_crash(tmp_path: Path) -> None:
    # Prepare
    store = LocalArtifactStore(tmp_path)

    # Execute / Assert
    assert not store.exists(SHA)
    with pytest.raises(ArtifactStoreError, match="not stored"):
        store.get(SHA)
    with pytest.raises(ArtifactStoreError, match="not stored"):
        store.size(SHA)
    with pytest.raises(ArtifactStoreError, match="not stored"):
        next(store.open_chunks(SHA))


@pytest.mark.parametrize("offset", [0, len(BLOB) // 2, len(BLOB) - 1])
def test_get_detects_a_flipped_byte(tmp_path: Path, offset: int) -> None:
    # Prepare
    store = LocalArtifactStore(tmp_path)
    store.put(BLOB)
    path = tmp_path / SHA[:2] / SHA
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))

    # Execute / Assert
    with pytest.raises(ArtifactStoreError, match="corrupt"):
        store.get(SHA)


def test_get_detects_a_truncated_blob(tmp_path: Path) -> None:
    # Prepare
    store = LocalArtifactStore(tmp_path)
    store.put(BLOB)
    path = tmp_path / SHA[:2] / SHA
    path.write_bytes(BLOB[:-1])

    # Execute / Assert
    with pytest.raises(ArtifactStoreError, match="corrupt"):
        store.get(SHA)


def test_put_leaves_no_temporary_files(tmp_path: Path) -> None:
    # Prepare
    store = LocalArtifactStore(tmp_path)

    # Execute
    for i in range(5):
        store.put(BLOB + bytes([i]))

    # Assert
    names = [p.name for p in files_under(tmp_path)]
    assert len(names) == 5
    assert not [name for name in names if name.startswith(".")]


def test_a_failed_put_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    store = LocalArtifactStore(tmp_path)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the store calls os.fsync before the rename

    # Execute / Assert
    with pytest.raises(OSError, match="No space left"):
        store.put(BLOB)
    assert files_under(tmp_path) == []
    assert not store.exists(SHA)


def test_open_chunks_streams_in_chunks(tmp_path: Path) -> None:
    # Prepare
    blob = os.urandom(3 * CHUNK + 5)
    store = LocalArtifactStore(tmp_path)
    sha256 = store.put(blob)

    # Execute
    chunks = store.open_chunks(sha256)
    first = next(chunks)
    rest = list(chunks)

    # Assert
    assert [len(first), *map(len, rest)] == [CHUNK, CHUNK, CHUNK, 5]
    assert first + b"".join(rest) == blob


def test_open_chunks_is_lazy(tmp_path: Path) -> None:
    # Prepare
    store = LocalArtifactStore(tmp_path)

    # Execute
    chunks = store.open_chunks(SHA)  # nothing is opened until the first chunk is asked for
    store.put(BLOB)

    # Assert
    assert b"".join(chunks) == BLOB
