"""The API's fixtures (the real app on the test database, keys of every role) for the CLI's tests."""

from tests.cloud.api.conftest import app, keys, settings, store

__all__ = ["app", "keys", "settings", "store"]
