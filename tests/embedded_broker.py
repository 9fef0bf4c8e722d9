"""Pytest plugin: the embedded broker fixture (filled in with broker/embedded.py)."""
