"""The embedded broker (`embedded.EmbeddedBroker`) on an event loop of its own, in a background thread:
how the demo, `diredi up` and the tests run it from synchronous code."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from broker.client import BrokerTarget
from broker.embedded import MAX_PACKET_SIZE, EmbeddedBroker
from broker.exceptions import EmbeddedBrokerError

log = logging.getLogger(__name__)


class EmbeddedBrokerThread:
    """An `EmbeddedBroker` on an event loop of its own, in a background thread (the demo, the tests).
    It can be stopped (or killed) and started again: same port, same state file."""

    def __init__(
        self,
        state_file: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        admin_user: str = "admin",
        admin_password: str | None = None,
        max_packet_size: int = MAX_PACKET_SIZE,
    ) -> None:
        self.broker = EmbeddedBroker(
            state_file,
            host=host,
            port=port,
            admin_user=admin_user,
            admin_password=admin_password,
            max_packet_size=max_packet_size,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def target(self) -> BrokerTarget:
        return self.broker.target

    def __enter__(self) -> EmbeddedBrokerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker; it returns once the port is listening (connections are accepted)."""
        if self._thread is not None:
            raise EmbeddedBrokerError("the embedded broker is already running")
        loop = asyncio.new_event_loop()
        started: Future[None] = Future()
        thread = threading.Thread(target=self._run, args=(loop, started), name="embedded-broker", daemon=True)
        thread.start()
        try:
            started.result(timeout)
        except TimeoutError:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            raise EmbeddedBrokerError(f"the embedded broker did not start within {timeout:g} s") from None
        except BaseException:
            thread.join(timeout)
            raise
        self._loop, self._thread = loop, thread

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect every client, stop listening and end the thread."""
        self._end(self.broker.stop, timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """Cut every connection without a word and end the thread (a crash, to the clients)."""
        self._end(self.broker.kill, timeout)

    def _end(self, how: Callable[[], Coroutine[Any, Any, None]], timeout: float) -> None:
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(how(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)

    def _run(self, loop: asyncio.AbstractEventLoop, started: Future[None]) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.broker.start())
        except Exception as exc:  # handed to start()'s caller
            started.set_exception(exc)
        else:
            started.set_result(None)
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()
