"""Enrolment by claim: a device whose image holds its batch's claim certificate asks the cloud for its
own certificate (POST /api/v1/enrol through the front, with its serial, which is its device id, and the
CSR of its own key), and asks again while an operator decides. The certificate is written where
`[credentials] certificate` says; from then on the device is a certificate device."""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
from pathlib import Path

from device_firmware_py.config import DeviceConfig, prepare_state_dir
from device_firmware_py.download import open_connection
from device_firmware_py.exceptions import ConfigError, DownloadError, EnrolmentError
from device_firmware_py.identity import certificate_problem, device_key, signing_request
from wire.errors import shown

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 1024  # a certificate, the CA's and the trusted keys
RETRY_S = 10.0  # after a network error or a busy cloud


def enrol(config: DeviceConfig, stopping: threading.Event, *, timeout_s: float | None = None) -> Path:
    """Obtain the device's certificate by claim; return its path. Waits while an operator decides or the
    cloud is unreachable (until `stopping` or `timeout_s`); EnrolmentError when the cloud refuses for
    good, ConfigError when the device is not configured to enrol."""
    enrolment, target = config.enrolment, config.credentials.certificate
    if enrolment is None or target is None:
        raise ConfigError("enrolment: needs an [enrolment] section and credentials.certificate")
    state_dir = prepare_state_dir(config)
    request = signing_request(device_key(state_dir), config.device_id)
    body = json.dumps({"serial": config.device_id, "csr": request}).encode()
    claim = (enrolment.claim_certificate, enrolment.claim_key)
    waited = 0.0
    while not stopping.is_set():
        try:
            status, answer = _post(config, body, claim)
        except DownloadError as exc:
            status, answer = 0, {"detail": str(exc)}
        if status == 201:
            return _install(target, str(answer.get("certificate", "")), state_dir, config.device_id)
        if status in (403, 409, 422) or status == 401:
            raise EnrolmentError(f"enrolment refused (HTTP {status}): {shown(str(answer.get('detail', '')))}")
        wait = enrolment.poll_s if status == 202 else RETRY_S
        log.info(
            "enrolment of %s: %s; asking again in %.0f s",
            config.device_id,
            "waiting for an operator" if status == 202 else shown(str(answer.get("detail", status))),
            wait,
        )
        if timeout_s is not None and waited + wait > timeout_s:
            raise EnrolmentError(f"not enrolled within {timeout_s:.0f} s (last answer: HTTP {status})")
        waited += wait
        stopping.wait(wait)
    raise EnrolmentError("enrolment stopped")


def _post(config: DeviceConfig, body: bytes, claim: tuple[Path, Path]) -> tuple[int, dict[str, object]]:
    ca_file = config.api.ca_file or config.broker.ca_file
    conn, prefix = open_connection(config.api.url, ca_file, config.api.timeout_s, claim)
    try:
        conn.request(
            "POST",
            prefix.rstrip("/") + "/api/v1/enrol",
            body=body,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        response = conn.getresponse()
        data = response.read(MAX_ANSWER_BYTES + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"network error: {type(exc).__name__}: {shown(str(exc))}") from None
    finally:
        conn.close()
    try:
        answer = json.loads(data) if len(data) <= MAX_ANSWER_BYTES else {}
    except ValueError:
        answer = {}
    return response.status, answer if isinstance(answer, dict) else {}


def _install(target: Path, certificate: str, state_dir: Path, device_id: str) -> Path:
    """Write the certificate the cloud issued, once it is checked to be this device's."""
    fresh = target.with_name(f".{target.name}.new")
    fresh.write_text(certificate)
    problem = certificate_problem(fresh, state_dir / "identity.key", device_id)
    if problem is not None:
        fresh.unlink()
        raise EnrolmentError(f"the cloud's certificate is not usable: {problem}")
    os.replace(fresh, target)
    log.info("enrolled: %s holds the device's certificate", target)
    return target
