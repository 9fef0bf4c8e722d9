"""A typed client of the operator REST API, for the `diredi` command line and for scripts.

    from cloud.client import FleetClient, load_config

    with FleetClient(load_config()) as fleet:          # DIREDI_API_URL, DIREDI_API_KEY or a profile
        for device in fleet.all_devices(selector="site=lab-2"):
            print(device.id, device.presence)

Every answer is read into the API's own response schema; an error answer (an RFC 9457 problem) or
no answer at all raises `ApiError` with one line that says what happened.
"""

from __future__ import annotations

import os
import stat
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cloud.api.schemas import (
    CommandPublic,
    DeviceProvisioned,
    DevicePublic,
    EnrolmentPublic,
    JobPublic,
    LineagePublic,
    ModelDetail,
    ModelPublic,
    Page,
    RolloutPublic,
    RolloutTargetPublic,
    TelemetryPublic,
)
from cloud.exceptions import CloudError

T = TypeVar("T", bound=BaseModel)

API_PREFIX = "/api/v1"
DEFAULT_TIMEOUT = 15.0  # seconds; a listing of 500 devices answers in well under one
PAGE_LIMIT = 500  # the API's largest page


class ApiError(CloudError):
    """The API refused a request (`status` and the problem's `detail`), or could not be reached."""

    def __init__(
        self, message: str, *, status: int | None = None, detail: str = "", unreachable: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.unreachable = unreachable  # no answer at all: down, or too slow


class ClientSettings(BaseSettings):
    """Where the API is and the key to use, from the environment (DIREDI_API_URL, DIREDI_API_KEY,
    DIREDI_PROFILE, DIREDI_PROFILES: the profile file)."""

    model_config = SettingsConfigDict(env_prefix="DIREDI_", extra="ignore")

    api_url: str | None = None
    api_key: SecretStr | None = None
    profile: str | None = None
    profiles: Path | None = None


@dataclass(frozen=True)
class ClientConfig:
    """An API's base URL (scheme, host, port) and the API key to present."""

    url: str
    key: SecretStr
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        parsed = httpx.URL(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise CloudError(f"the API URL must be http(s)://host[:port], not {self.url!r}")
        if not self.key.get_secret_value().strip():
            raise CloudError("the API key is empty")


def profiles_path(settings: ClientSettings | None = None) -> Path:
    """The profile file: DIREDI_PROFILES, else $XDG_CONFIG_HOME/diredi/profiles.toml."""
    if (explicit := (settings or ClientSettings()).profiles) is not None:
        return explicit.expanduser()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "diredi" / "profiles.toml"


def load_config(
    *,
    url: str | None = None,
    key: str | None = None,
    profile: str | None = None,
    path: Path | None = None,
) -> ClientConfig:
    """The API to talk to: `url` and `key` as given, else DIREDI_API_URL and DIREDI_API_KEY, else the
    profile (`profile`, DIREDI_PROFILE, or "default") of the profile file, a TOML table per profile:

        [default]
        url = "https://fleet.example.com"
        key_file = "~/.config/diredi/operator.key"   # or key = "..." in a file only its owner reads
    """
    env = ClientSettings()
    url = url or env.api_url
    key = key or (env.api_key.get_secret_value() if env.api_key else None)
    name = profile or env.profile
    if url is None or key is None or profile is not None:
        entry = _profile(path or profiles_path(env), name or "default", required=name is not None)
        url = url or _text(entry, "url")
        key = key or _key_of(entry)
    if not url:
        raise CloudError("no API URL: set DIREDI_API_URL, pass --api-url, or write a profile")
    if not key:
        raise CloudError("no API key: set DIREDI_API_KEY, pass --api-key, or write a profile")
    return ClientConfig(url=url.rstrip("/"), key=SecretStr(key))


def _profile(path: Path, name: str, *, required: bool) -> Mapping[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if required:
            raise CloudError(f"profile {name!r}: there is no profile file {path}") from None
        return {}
    except OSError as exc:
        raise CloudError(f"cannot read the profile file {path}: {exc.strerror}") from None
    try:
        profiles = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CloudError(f"the profile file {path} is not valid TOML: {exc}") from None
    entry = profiles.get(name)
    if entry is None:
        if required:
            raise CloudError(f"the profile file {path} has no profile {name!r}")
        return {}
    if not isinstance(entry, dict):
        raise CloudError(f"profile {name!r} in {path} must be a table ([{name}])")
    if "key" in entry and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CloudError(f"the profile file {path} holds a key and others may read it: chmod 600 {path}")
    return {**entry, "_path": path}


def _text(entry: Mapping[str, Any], field: str) -> str | None:
    value = entry.get(field)
    if value is not None and not isinstance(value, str):
        raise CloudError(f"{field} in the profile file {entry['_path']} must be a string")
    return value


def _key_of(entry: Mapping[str, Any]) -> str | None:
    if (key := _text(entry, "key")) is not None:
        return key
    if (key_file := _text(entry, "key_file")) is None:
        return None
    path = Path(key_file).expanduser()
    try:
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CloudError(f"the key file {path} may be read by others: chmod 600 {path}")
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CloudError(f"cannot read the key file {path}: {exc}") from None


def _params(**values: Any) -> dict[str, Any]:
    """Query parameters: the ones given, times in ISO 8601."""
    return {
        name: value.isoformat() if isinstance(value, datetime) else value
        for name, value in values.items()
        if value is not None
    }


class FleetClient:
    """The operator API over HTTP; one keep-alive connection, closed with the client."""

    def __init__(self, config: ClientConfig, *, transport: httpx.BaseTransport | None = None) -> None:
        self.config = config
        self._http = httpx.Client(
            base_url=config.url + API_PREFIX,
            headers={"Authorization": f"Bearer {config.key.get_secret_value()}"},
            timeout=config.timeout,
            transport=transport,
        )

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # devices

    def devices(
        self,
        *,
        cohort_id: str | None = None,
        status: str | None = None,
        presence: str | None = None,
        model_id: str | None = None,
        selector: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Page[DevicePublic]:
        """One page of devices, by id, filtered (`selector`: labels, e.g. "site=lab-2,tier!=beta")."""
        params = _params(
            cohort_id=cohort_id,
            status=status,
            presence=presence,
            model_id=model_id,
            selector=selector,
            limit=limit,
            offset=offset,
        )
        return self._read(Page[DevicePublic], "GET", "/devices", params=params)

    def all_devices(self, **filters: Any) -> Iterator[DevicePublic]:
        """Every device that matches `filters` (those of `devices`), page after page."""
        offset = 0
        while True:
            page = self.devices(**filters, limit=PAGE_LIMIT, offset=offset)
            yield from page.items
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return

    def device(self, device_id: str) -> DevicePublic:
        return self._read(DevicePublic, "GET", f"/devices/{_segment(device_id)}")

    # enrolment by claim

    def enrolments(
        self, *, state: str | None = None, limit: int = 100, offset: int = 0
    ) -> Page[EnrolmentPublic]:
        """One page of enrolments, newest first (`state="pending"`: waiting for an operator)."""
        params = _params(state=state, limit=limit, offset=offset)
        return self._read(Page[EnrolmentPublic], "GET", "/enrolments", params=params)

    def preregister(
        self, serial: str, cohort_id: str, labels: Mapping[str, str] | None = None
    ) -> EnrolmentPublic:
        """Approve a serial number before its device asks."""
        body = {"serial": serial, "cohort_id": cohort_id, "labels": dict(labels or {})}
        return self._read(EnrolmentPublic, "POST", "/enrolments", json=body)

    def decide_enrolment(
        self, serial: str, *, approve: bool, cohort_id: str | None = None
    ) -> EnrolmentPublic:
        """Approve a request (into `cohort_id`) or refuse it."""
        path = f"/enrolments/{_segment(serial)}/{'approve' if approve else 'refuse'}"
        return self._read(EnrolmentPublic, "POST", path, json={"cohort_id": cohort_id} if approve else None)

    def provision(
        self,
        device_id: str,
        cohort_id: str,
        labels: Mapping[str, str] | None = None,
        *,
        csr: str | None = None,
    ) -> DeviceProvisioned:
        """Provision a device; the answer holds its secret, shown this once, or with `csr` (PEM) the
        certificate the fleet CA issued for the device's key."""
        body: dict[str, object] = {"id": device_id, "cohort_id": cohort_id, "labels": dict(labels or {})}
        if csr is not None:
            body["csr"] = csr
        return self._read(DeviceProvisioned, "POST", "/devices", json=body)

    def revoke(self, device_id: str) -> DevicePublic:
        return self._read(DevicePublic, "POST", f"/devices/{_segment(device_id)}/revoke")

    def label(self, device_id: str, changes: Mapping[str, str | None]) -> DevicePublic:
        """Set labels (a value) or remove them (None); the others stay."""
        body = {"labels": dict(changes)}
        return self._read(DevicePublic, "PATCH", f"/devices/{_segment(device_id)}", json=body)

    def send_command(self, device_id: str, command: str, *, ttl_s: int | None = None) -> CommandPublic:
        """Ask a device to run `command` (report_now, run_rd): delivered now if it is online, else when
        it comes back within `ttl_s` seconds."""
        body: dict[str, Any] = {"command": command}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        return self._read(CommandPublic, "POST", f"/devices/{_segment(device_id)}/commands", json=body)

    def command(self, device_id: str, command_id: uuid.UUID) -> CommandPublic:
        return self._read(CommandPublic, "GET", f"/devices/{_segment(device_id)}/commands/{command_id}")

    def commands(self, device_id: str, *, limit: int = 100, offset: int = 0) -> Page[CommandPublic]:
        """A device's commands, newest first."""
        params = _params(limit=limit, offset=offset)
        return self._read(
            Page[CommandPublic], "GET", f"/devices/{_segment(device_id)}/commands", params=params
        )

    # models

    def models(
        self,
        *,
        cohort_id: str | None = None,
        kind: str | None = None,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Page[ModelPublic]:
        params = _params(cohort_id=cohort_id, kind=kind, status=status, limit=limit, offset=offset)
        return self._read(Page[ModelPublic], "GET", "/models", params=params)

    def model(self, model_id: str) -> ModelDetail:
        return self._read(ModelDetail, "GET", f"/models/{_segment(model_id)}")

    def approve(self, model_id: str, reason: str = "") -> ModelPublic:
        return self._read(
            ModelPublic, "POST", f"/models/{_segment(model_id)}/approve", json={"reason": reason}
        )

    def reject(self, model_id: str, reason: str = "") -> ModelPublic:
        return self._read(
            ModelPublic, "POST", f"/models/{_segment(model_id)}/reject", json={"reason": reason}
        )

    def lineage(self, model_id: str) -> LineagePublic:
        return self._read(LineagePublic, "GET", f"/models/{_segment(model_id)}/lineage")

    # rollouts

    def rollouts(
        self, *, cohort_id: str | None = None, state: str | None = None, limit: int = 100, offset: int = 0
    ) -> Page[RolloutPublic]:
        params = _params(cohort_id=cohort_id, state=state, limit=limit, offset=offset)
        return self._read(Page[RolloutPublic], "GET", "/rollouts", params=params)

    def rollout(self, rollout_id: uuid.UUID) -> RolloutPublic:
        return self._read(RolloutPublic, "GET", f"/rollouts/{rollout_id}")

    def rollout_targets(
        self, rollout_id: uuid.UUID, *, limit: int = 100, offset: int = 0
    ) -> Page[RolloutTargetPublic]:
        params = _params(limit=limit, offset=offset)
        return self._read(Page[RolloutTargetPublic], "GET", f"/rollouts/{rollout_id}/targets", params=params)

    def start_rollout(
        self,
        model_id: str,
        *,
        plan: Mapping[str, Any] | None = None,
        device_ids: list[str] | None = None,
        selector: str | None = None,
    ) -> RolloutPublic:
        """Start a staged rollout of an approved edge model to its cohort, to `device_ids` (the first
        of them the canary), or to the devices whose labels `selector` matches, resolved again before
        each wave."""
        body: dict[str, Any] = {"model_id": model_id}
        for name, value in (("plan", plan), ("device_ids", device_ids), ("selector", selector)):
            if value is not None:
                body[name] = value
        return self._read(RolloutPublic, "POST", "/rollouts", json=body)

    def steer(self, rollout_id: uuid.UUID, action: str, reason: str = "") -> RolloutPublic:
        """`action` one of pause, resume, halt, rollback."""
        if action not in ("pause", "resume", "halt", "rollback"):
            raise ValueError(f"no rollout action {action!r}")
        return self._read(RolloutPublic, "POST", f"/rollouts/{rollout_id}/{action}", json={"reason": reason})

    # jobs

    def jobs(
        self,
        *,
        cohort_id: str | None = None,
        state: str | None = None,
        type: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Page[JobPublic]:
        params = _params(cohort_id=cohort_id, state=state, type=type, limit=limit, offset=offset)
        return self._read(Page[JobPublic], "GET", "/jobs", params=params)

    def job(self, job_id: uuid.UUID) -> JobPublic:
        return self._read(JobPublic, "GET", f"/jobs/{job_id}")

    def cancel_job(self, job_id: uuid.UUID, reason: str = "") -> JobPublic:
        return self._read(JobPublic, "POST", f"/jobs/{job_id}/cancel", json={"reason": reason})

    def retry_job(self, job_id: uuid.UUID) -> JobPublic:
        """A failed or cancelled RD cycle again, as a new job (returned)."""
        return self._read(JobPublic, "POST", f"/jobs/{job_id}/retry")

    # telemetry

    def telemetry(
        self,
        *,
        device_id: str | None = None,
        model_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Page[TelemetryPublic]:
        """Status samples, newest first."""
        params = _params(
            device_id=device_id, model_id=model_id, since=since, until=until, limit=limit, offset=offset
        )
        return self._read(Page[TelemetryPublic], "GET", "/telemetry", params=params)

    # the wire

    def _read(self, schema: type[T], method: str, path: str, **request: Any) -> T:
        answer = self.request(method, path, **request)
        try:
            return schema.model_validate(answer)
        except ValidationError as exc:
            raise ApiError(
                f"{method} {path}: the API's answer is not a {schema.__name__} ({exc.error_count()} errors): "
                "is the client as new as the server?"
            ) from None

    def request(self, method: str, path: str, **request: Any) -> Any:
        """One call under /api/v1; the decoded JSON answer."""
        where = f"{self.config.url}{API_PREFIX}{path}"
        try:
            response = self._http.request(method, path, **request)
        except httpx.TimeoutException:
            why = f"the API at {self.config.url} did not answer within {self.config.timeout:g} s"
            raise ApiError(why, unreachable=True) from None
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the API at {self.config.url}: {exc}", unreachable=True) from None
        if response.is_error:
            raise _problem(method, where, response)
        try:
            return response.json()
        except ValueError:
            raise ApiError(
                f"{method} {where}: the answer is not JSON (HTTP {response.status_code})"
            ) from None


def _segment(value: str) -> str:
    """`value` as one path segment: a slash or dot segment would address another resource."""
    if not value or "/" in value or value in (".", ".."):
        raise CloudError(f"not a valid id: {value!r}")
    return value


def _problem(method: str, where: str, response: httpx.Response) -> ApiError:
    status = response.status_code
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if isinstance(problem, dict) and isinstance(problem.get("detail"), str):
        title = problem.get("title") or response.reason_phrase
        detail = problem["detail"]
        return ApiError(f"{status} {title}: {detail}", status=status, detail=detail)
    return ApiError(f"{method} {where}: HTTP {status} {response.reason_phrase}", status=status)
