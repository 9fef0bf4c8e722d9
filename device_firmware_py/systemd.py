"""The daemon's life under systemd: the notification protocol (sd_notify(3): READY, WATCHDOG, STATUS,
STOPPING, sent as datagrams to $NOTIFY_SOCKET; outside systemd, no socket, every call does nothing),
and SIGTERM/SIGINT as a request to stop."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from types import FrameType

log = logging.getLogger(__name__)


class Notifier:
    """Talks to the service manager, if there is one."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # WATCHDOG_USEC is set when the unit has WatchdogSec=; ping at a third of it.
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 3e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self._socket is not None

    def send(self, *fields: str) -> None:
        """Send `KEY=value` fields in one datagram; a lost manager is logged, never raised."""
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            log.warning("could not notify systemd: %s", exc)

    def ready(self, status: str) -> None:
        """Start-up is done (Type=notify units count as started from here)."""
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """A line `systemctl status` shows."""
        self.send(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        """Shutting down."""
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        """Tell the watchdog the daemon is alive, at most every third of its interval."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_interval:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def close(self) -> None:
        """Release the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def stop_on_signals(stopping: threading.Event) -> None:
    """Make SIGTERM and SIGINT set `stopping` (from the main thread). The command line calls this
    before the daemon's slow imports and start-up, so a stop during start-up is a clean one too."""

    def on_signal(number: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(number).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
