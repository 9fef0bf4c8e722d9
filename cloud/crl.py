"""The fleet CA's revocation list as the registry says it should be, and the broker's reload of it.

A certificate device is refused by the broker's TLS handshake once its serial is on the CRL the broker
has loaded. `CrlPublisher.publish` writes the CRL of every revoked certificate device (the fleet CA
checks it before it replaces the file) and tells the broker to read it again: mosquitto re-reads its
`crlfile` on SIGHUP, sent to the process named by its pid file (`broker_pid_file`). Reloading does not
end sessions already open: the broker hook kicks a revoked device after the reload (`broker_hook`).
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from cloud.exceptions import HookError, SigningError
from cloud.fleet_ca import FleetCA
from cloud.registry.devices import revoked_certificates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedCrl:
    path: Path
    revoked: int  # certificates it lists
    next_update: datetime


class CrlPublisher:
    """Writes the CRL from the registry and reloads the broker that reads it (when `pid_file` is set;
    else reloading is the deployment's, say a systemd path unit on the file)."""

    def __init__(self, ca_dir: Path, sessions: sessionmaker[Session], pid_file: Path | None = None) -> None:
        self.ca_dir = ca_dir  # the CA is opened when a CRL is first published: most fleets have none
        self.sessions = sessions
        self.pid_file = pid_file

    @property
    def exists(self) -> bool:
        """Whether the fleet CA has been made (by the first certificate device)."""
        return (self.ca_dir / "ca.key").exists()

    def publish(self) -> PublishedCrl:
        """Issue the CRL of the registry's revoked certificates and reload the broker; HookError (safe
        to show) when either fails. The file is written even when the broker is down: a broker that
        starts reads it."""
        with self.sessions() as session:
            revoked = revoked_certificates(session)
        try:
            ca = FleetCA.open(self.ca_dir)
            path = ca.write_crl(revoked)
            next_update = ca.check_crl(path.read_bytes())
        except (SigningError, OSError) as exc:
            raise HookError(f"the CRL could not be written: {exc}") from None
        if self.pid_file is not None:
            reload_broker(self.pid_file)
        log.info("published the CRL of %d revoked certificates", len(revoked))
        return PublishedCrl(path, len(revoked), next_update)


def reload_broker(pid_file: Path) -> None:
    """SIGHUP the mosquitto whose pid `pid_file` holds; HookError when it is not running. A stale pid
    file may name another process, which SIGHUP would end: the process's name is checked first."""
    try:
        pid = int(pid_file.read_text().strip())
        if pid <= 1:
            raise ValueError(f"pid {pid}")
        comm = Path(f"/proc/{pid}/comm")
        if comm.parent.parent.is_dir() and comm.read_text().strip() != "mosquitto":
            raise ValueError(f"process {pid} is not mosquitto (a stale pid file?)")
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        raise HookError(f"broker: cannot reload it through {pid_file}: {exc}") from None
