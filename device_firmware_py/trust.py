"""The keys this device trusts, and its clock.

The device starts from the keys of its configuration (`[trust]`, version `trust_version`, and
`trust_threshold` signatures by them needed to change them, all three as provisioning returned
them). The cloud's trust chain (wire/trust.py), retained on the fleet's trust topic, moves it to
later versions: each accepted document is kept in the state directory, so a
restart resumes from it and an older chain can never take the device back.

A Raspberry Pi has no battery-backed clock: until NTP has set it, it may read 1970 or the time it was
last shut down. Dates are checked only against a clock that is past `CLOCK_FLOOR` (no document this
firmware can accept was issued before it); until then documents wait (see ota.Updater).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from device_firmware_py.exceptions import ClockNotSetError
from device_firmware_py.files import write_atomically
from wire.common import utcnow
from wire.errors import ContractError
from wire.strictjson import strict_json
from wire.trust import TrustChain, TrustDocument, next_trust

log = logging.getLogger(__name__)

CLOCK_FLOOR = datetime(2026, 1, 1, tzinfo=UTC)


def clock_is_set(now: datetime) -> bool:
    """Whether `now` can be trusted to bound a document's date (it is past the firmware's floor)."""
    return now >= CLOCK_FLOOR


class TrustStore(Mapping[str, bytes]):
    """The trusted raw Ed25519 public keys by key_id (a live view: it changes when a chain is applied)."""

    def __init__(
        self,
        root: Mapping[str, bytes],
        state_file: Path,
        *,
        root_version: int = 0,
        root_threshold: int = 1,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.state_file = state_file
        self.now = now
        self._keys = dict(root)
        self.version = root_version
        self.threshold = root_threshold
        saved = self._load()
        if saved is not None and saved.version > root_version:
            self._adopt(saved)

    def __getitem__(self, key_id: str) -> bytes:
        return self._keys[key_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def apply(self, payload: bytes) -> TrustDocument | None:
        """Move to the newest version of a received chain this device can reach; return it, or None
        when the chain holds nothing newer. Raises ContractError (nothing changes) for a chain that does
        not verify, and ClockNotSetError (one) when the clock is not set: the chain is to be applied
        again later."""
        chain = TrustChain.from_bytes(payload)
        now = self.now()
        if not clock_is_set(now):
            raise ClockNotSetError(f"the clock ({now.isoformat()}) is not set yet")
        reached = next_trust(self._keys, self.threshold, self.version, chain, now)
        if reached is None:
            return None
        write_atomically(self.state_file, reached.model_dump_json(by_alias=True).encode())
        self._adopt(reached)
        log.info("trust moved to version %d: keys %s", reached.version, ", ".join(sorted(reached.keys)))
        return reached

    def _adopt(self, document: TrustDocument) -> None:
        self._keys, self.threshold, self.version = document.raw_keys(), document.threshold, document.version

    def _load(self) -> TrustDocument | None:
        try:
            return TrustDocument.model_validate(strict_json(self.state_file.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ContractError, ValidationError) as exc:
            # The configuration's keys are the root of trust; the retained chain leads on from them.
            log.error(
                "trust state %s is unreadable (%s); starting from the configured keys", self.state_file, exc
            )
            return None
