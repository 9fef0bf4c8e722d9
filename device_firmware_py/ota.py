"""Over-the-air model updates: A/B slots, and the updater that verifies a signed DesiredModel, fetches
its artifact (`download.py`), self-tests the new model, swaps it in atomically and rolls back."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from device_firmware_py.exceptions import (
    ArtifactError,
    DownloadCancelled,
    DownloadError,
    SlotError,
)
from device_firmware_py.files import private_dir, write_atomically
from device_firmware_py.runtime import Int8Model
from device_firmware_py.trust import clock_is_set
from wire import AckResult, ArtifactManifest, ContractError, DesiredModel, MessageKind
from wire.common import utcnow
from wire.desired import verify_raw
from wire.errors import UnknownKeyError, shown
from wire.limits import max_payload_bytes
from wire.trust import MAX_CLOCK_SKEW, check_issued_at

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
POINTER_FILE = "active.json"


@dataclass(frozen=True)
class _Pointer:
    active: str | None = None
    previous: str | None = None  # what `roll_back` returns to
    staged: str | None = None  # complete and fsync'd, what `switch` activates


class ModelSlots:
    """Two model slots (`root/a`, `root/b`) and an atomically replaced pointer naming the active one.

    Staging only ever writes the inactive slot, and only the pointer's `os.replace` changes which model
    is active, so a crash at any point leaves the active model intact and loadable. Not thread-safe:
    one updater owns the slots.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        private_dir(root)
        for name in SLOTS:
            private_dir(root / name)

    def _read_pointer(self) -> _Pointer:
        path = self.root / POINTER_FILE
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return _Pointer()
        except (OSError, ValueError) as exc:
            raise SlotError(f"slot pointer {path} is unreadable: {exc}") from None
        fields = {k: raw.get(k) for k in ("active", "previous", "staged")} if isinstance(raw, dict) else {}
        if not fields or any(v is not None and v not in SLOTS for v in fields.values()):
            raise SlotError(f"slot pointer {path} does not name slots {SLOTS}")
        return _Pointer(**fields)

    def _write_pointer(self, pointer: _Pointer) -> None:
        data = json.dumps({"active": pointer.active, "previous": pointer.previous, "staged": pointer.staged})
        try:
            write_atomically(self.root / POINTER_FILE, data.encode())
        except OSError as exc:
            raise SlotError(f"cannot write the slot pointer: {exc}") from None

    def files(self, name: str) -> tuple[Path, Path]:
        """The model and manifest paths of slot `name`."""
        return self.root / name / MODEL_FILE, self.root / name / MANIFEST_FILE

    def _contents(self, name: str | None) -> tuple[Path, ArtifactManifest] | None:
        if name is None:
            return None
        model_path, manifest_path = self.files(name)
        try:
            return model_path, ArtifactManifest.from_json(manifest_path.read_bytes())
        except OSError as exc:
            raise SlotError(f"slot {name} has no readable manifest: {exc}") from None
        except ContractError as exc:
            raise SlotError(f"slot {name}: {exc}") from None

    def active_name(self) -> str | None:
        """The active slot's name, None when nothing is installed."""
        return self._read_pointer().active

    def other_name(self) -> str:
        """The slot that is not active (the one `stage` writes)."""
        active = self.active_name()
        return SLOTS[1] if active == SLOTS[0] else SLOTS[0]

    def active(self) -> tuple[Path, ArtifactManifest] | None:
        """The active slot's model path and manifest, None when nothing is installed."""
        return self._contents(self.active_name())

    def staged(self) -> tuple[Path, ArtifactManifest] | None:
        """The staged slot's model path and manifest, None when nothing is staged."""
        return self._contents(self._read_pointer().staged)

    def stage(self, model: bytes, manifest: ArtifactManifest) -> str:
        """Write `model` and its manifest into the inactive slot (fsync'd) without switching; return the
        slot's name. The slot stops being a rollback target before its first byte is overwritten."""
        pointer = self._read_pointer()
        target = self.other_name()
        self._write_pointer(_Pointer(active=pointer.active))
        model_path, manifest_path = self.files(target)
        try:
            private_dir(model_path.parent)
            write_atomically(model_path, model)
            write_atomically(manifest_path, manifest.to_json().encode())
        except OSError as exc:
            raise SlotError(f"cannot stage into slot {target}: {exc}") from None
        self._write_pointer(_Pointer(active=pointer.active, staged=target))
        return target

    def switch(self) -> None:
        """Make the staged slot active in one atomic step; the old active slot becomes `previous`."""
        pointer = self._read_pointer()
        if pointer.staged is None:
            raise SlotError("nothing is staged to switch to")
        self._write_pointer(_Pointer(active=pointer.staged, previous=pointer.active))

    def roll_back(self) -> None:
        """Make the previous slot active again (nothing active if there was none before the switch)."""
        pointer = self._read_pointer()
        if pointer.active is None:
            raise SlotError("nothing is active to roll back from")
        self._write_pointer(_Pointer(active=pointer.previous))

    def activate(self, name: str) -> None:
        """Make slot `name` active with no rollback target (for when the active slot is found broken)."""
        if name not in SLOTS:
            raise SlotError(f"no slot {name!r}; the slots are {SLOTS}")
        self._write_pointer(_Pointer(active=name))


def load_slot(slots: ModelSlots, name: str) -> Int8Model:
    """Load slot `name` in the int8 runtime and self-test it; raise ArtifactError if either fails."""
    model = Int8Model.from_files(*slots.files(name))
    model.self_test()
    return model


# --- updater ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateOutcome:
    """What applying one desired-model document did, ready to become a model ack.

    `result` is None when there is nothing to do (the document names the running model): no ack.
    `model` is the freshly loaded model to serve when `result` is `installed`.
    """

    result: AckResult | None
    reason: str = ""
    model_id: str | None = None  # the model the document named, if it could be parsed
    running_model_id: str | None = None  # what serves after the attempt
    model: Int8Model | None = None
    # Apply the same document again later: it waits for the clock to be set (no ack yet), or was
    # signed by a key that a trust update may still bring.
    retry: bool = False


class _Refused(Exception):
    """One check failed; the text is the ack's reason."""

    def __init__(self, reason: str, *, retry: bool = False) -> None:
        super().__init__(reason)
        self.retry = retry


class _Waiting(Exception):
    """The document cannot be judged yet (the clock is not set); the text says why."""


class Updater:
    """Applies signed DesiredModel documents to a device's slots: verify, fetch, check, stage,
    self-test, switch, self-test again, roll back on failure. The old model stays active on any failure.
    """

    def __init__(
        self,
        device_id: str,
        trusted_keys: Mapping[str, bytes],
        slots: ModelSlots,
        fetch: Callable[[DesiredModel], bytes],
        state_file: Path,
        *,
        now: Callable[[], datetime] = utcnow,
        on_switched: Callable[[Path], None] | None = None,
    ) -> None:
        """`trusted_keys` may change between documents (a TrustStore). `on_switched` is a test seam:
        called with the new active model's path between the switch and the post-swap reload, so a test
        can corrupt the file as a failing disk would."""
        self.device_id = device_id
        self.trusted_keys = trusted_keys
        self.now = now
        self.slots = slots
        self.fetch = fetch
        self.state_file = state_file
        self._on_switched = on_switched

    def load_active(self) -> Int8Model | None:
        """The active model, loaded and self-tested; falls back to the other slot (and makes it active)
        when the active one is broken; None when nothing usable is installed."""
        try:
            active = self.slots.active_name()
        except SlotError as exc:
            log.error("%s; trying both slots", exc)
            active, candidates = None, list(SLOTS)
        else:
            if active is None:
                return None
            candidates = [active, *(name for name in SLOTS if name != active)]
        for name in candidates:
            try:
                model = load_slot(self.slots, name)
            except (ArtifactError, ValueError) as exc:
                log.error("model slot %s does not load: %s", name, exc)
                continue
            if name != active:
                log.warning(
                    "serving %s from slot %s: the active slot is broken", model.manifest.model_id, name
                )
                try:
                    self.slots.activate(name)
                except SlotError as exc:  # serve it anyway; the next start tries again
                    log.error("cannot record slot %s as active: %s", name, exc)
            return model
        return None

    def apply(self, payload: bytes) -> UpdateOutcome:
        """Act on one received `model/desired` payload. Never raises for bad input or a failed install:
        every failure is an outcome with the check that failed. DownloadCancelled propagates (the daemon
        is stopping; the old model stays active), as do KeyboardInterrupt and SystemExit."""
        desired: DesiredModel | None = None
        try:
            desired = self._verified(payload)
            return self._install(desired)
        except DownloadCancelled:
            raise
        except _Waiting as exc:
            log.info("desired model waits: %s", exc)
            return UpdateOutcome(None, str(exc), retry=True)
        except _Refused as exc:
            outcome = self._failed(desired, str(exc), retry=exc.retry)
        except Exception as exc:  # an unforeseen failure must not kill the daemon or the old model
            log.exception("unexpected error while applying a desired model")
            outcome = self._failed(desired, f"unexpected error: {type(exc).__name__}: {shown(str(exc))}")
        log.warning("desired model %s refused: %s", outcome.model_id, outcome.reason)
        return outcome

    def _running(self) -> ArtifactManifest | None:
        try:
            current = self.slots.active()
        except SlotError as exc:
            log.error("the active slot is unreadable (%s); treating the device as having no model", exc)
            return None
        return None if current is None else current[1]

    def _failed(self, desired: DesiredModel | None, reason: str, *, retry: bool = False) -> UpdateOutcome:
        running = self._running()
        return UpdateOutcome(
            AckResult.failed,
            reason[:1024],
            desired.manifest.model_id if desired is not None else None,
            running.model_id if running is not None else None,
            retry=retry,
        )

    def _verified(self, payload: bytes) -> DesiredModel:
        limit = max_payload_bytes(MessageKind.MODEL_DESIRED)
        if len(payload) > limit:
            raise _Refused(f"document of {len(payload)} bytes exceeds the {limit}-byte limit")
        now = self.now()
        if not clock_is_set(now):
            raise _Waiting(f"the clock ({now.isoformat()}) is not set yet")
        try:
            desired = verify_raw(payload, self.trusted_keys)
        except UnknownKeyError as exc:
            raise _Refused(f"rejected document: {exc}", retry=True) from None
        except ContractError as exc:
            raise _Refused(f"rejected document: {exc}") from None
        except ValueError as exc:  # not JSON at all, or JSON the signature check cannot read
            raise _Refused(f"rejected document: {shown(str(exc))}") from None
        if desired.device_id != self.device_id:
            raise _Refused(f"document is for device {desired.device_id}, not {self.device_id}")
        if desired.issued_at.tzinfo is None:
            raise _Refused("document's issued_at has no time zone")
        try:
            check_issued_at(desired.issued_at, now, "the document")
        except ContractError as exc:
            raise _Refused(str(exc)) from None
        last = self._last_issued_at()
        if last is not None and last > now + MAX_CLOCK_SKEW:
            # Accepted by a firmware that did not bound dates: it would refuse every later document.
            log.warning("the last accepted document is dated %s, in the future: forgotten", last.isoformat())
            last = None
        if last is not None and desired.issued_at < last:
            raise _Refused(
                f"replayed document: issued_at {desired.issued_at.isoformat()} is older than "
                f"the last accepted {last.isoformat()}"
            )
        return desired

    def _install(self, desired: DesiredModel) -> UpdateOutcome:
        manifest = desired.manifest
        running = self._running()
        if running is not None and running.model_id == manifest.model_id:
            if running.sha256 != manifest.sha256:
                raise _Refused(f"document names the running model {manifest.model_id} with another sha256")
            self._accept(desired)
            return UpdateOutcome(None, "", manifest.model_id, running.model_id)
        # Versions order one line; a document for another line moves the device to another cohort.
        if (
            running is not None
            and desired.rollback_of is None
            and running.line == manifest.line
            and manifest.version <= running.version
        ):
            raise _Refused(
                f"version {manifest.version} is not newer than the running {running.model_id} "
                f"(version {running.version}) and the document is not a signed rollback"
            )
        self._accept(desired)
        try:
            model = self.fetch(desired)
        except (DownloadError, ArtifactError) as exc:
            raise _Refused(f"download failed: {exc}") from None
        except (DownloadCancelled, _Refused):
            raise
        except Exception as exc:
            raise _Refused(f"download failed: {type(exc).__name__}: {shown(str(exc))}") from None
        if len(model) != manifest.size:
            raise _Refused(f"size mismatch: got {len(model)} bytes, the manifest says {manifest.size}")
        digest = hashlib.sha256(model).hexdigest()
        if digest != manifest.sha256:
            raise _Refused(f"sha256 mismatch: got {digest}, the manifest says {manifest.sha256}")
        try:
            staged = self.slots.stage(model, manifest)
        except SlotError as exc:
            raise _Refused(f"staging failed: {exc}") from None
        try:
            load_slot(self.slots, staged)
        except (ArtifactError, ValueError) as exc:
            raise _Refused(f"self-test before the swap failed: {exc}") from None
        try:
            self.slots.switch()
        except SlotError as exc:
            raise _Refused(f"switch failed: {exc}") from None
        log.info("switched to %s in slot %s", manifest.model_id, staged)
        return self._after_switch(desired, staged)

    def _after_switch(self, desired: DesiredModel, slot: str) -> UpdateOutcome:
        model_id = desired.manifest.model_id
        if self._on_switched is not None:
            self._on_switched(self.slots.files(slot)[0])
        try:
            model = load_slot(self.slots, slot)
        except (ArtifactError, ValueError) as exc:
            self.slots.roll_back()
            running = self._running()
            running_id = running.model_id if running is not None else None
            reason = f"self-test after the swap failed: {exc}; rolled back to {running_id or 'no model'}"
            log.error("%s", reason)
            return UpdateOutcome(AckResult.rolled_back, reason[:1024], model_id, running_id)
        log.info("installed %s", model_id)
        return UpdateOutcome(AckResult.installed, "", model_id, model_id, model)

    def _last_issued_at(self) -> datetime | None:
        try:
            raw: Any = json.loads(self.state_file.read_bytes())
            return None if raw is None else datetime.fromisoformat(raw["last_issued_at"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Failing closed: without it, any old signed document could be replayed.
            raise _Refused(f"replay state {self.state_file} is unreadable: {type(exc).__name__}") from None

    def _accept(self, desired: DesiredModel) -> None:
        last = self._last_issued_at()
        if last is not None and desired.issued_at <= last <= self.now() + MAX_CLOCK_SKEW:
            return
        data = json.dumps({"last_issued_at": desired.issued_at.isoformat()}).encode()
        private_dir(self.state_file.parent)
        write_atomically(self.state_file, data)
