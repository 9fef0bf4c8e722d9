"""Registry fixtures: a local artifact store next to the parametrized test database."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.artifacts import LocalArtifactStore


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    """An empty artifact store in the test's temporary directory."""
    return LocalArtifactStore(tmp_path / "artifacts")
