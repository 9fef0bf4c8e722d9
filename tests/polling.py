"""Waiting in tests for something another process or thread does."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, missing: Callable[[], str] | str) -> T:
    """Poll `condition` (every 20 ms) until it returns something true, and return that; after `timeout`
    seconds fail with `missing` (a text, or a function that says what is still missing)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            what = missing() if callable(missing) else missing
            raise AssertionError(f"after {timeout:g} s: {what}")
        time.sleep(0.02)
