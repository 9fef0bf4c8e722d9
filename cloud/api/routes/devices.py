"""Devices: provisioning (a one-time password, or a certificate for the device's own key), labels,
revocation, listing."""

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import Field

from cloud.api.deps import Operator, PageQuery, ReaderDep, ServicesDep, SessionDep, Viewer
from cloud.api.problems import Problem
from cloud.api.schemas import (
    DeviceCreate,
    DeviceProvisioned,
    DevicePublic,
    DeviceUpdate,
    Page,
    Selector,
    TrustedKey,
    errors,
    page_response,
)
from cloud.provisioning import describe_failure
from cloud.registry import audit
from cloud.registry.devices import (
    Certificate,
    broker_applied,
    broker_failed,
    check_new_device,
    get_device,
    list_devices_async,
    provision_certificate_device,
    provision_device,
    revoke_device,
    set_labels,
)
from cloud.registry.tables import BrokerSync, DeviceStatus, Presence

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/devices", tags=["devices"])


class DeviceFilter(PageQuery):
    cohort_id: str | None = Field(None, max_length=63)
    status: DeviceStatus | None = None
    presence: Presence | None = None
    model_id: str | None = Field(None, max_length=128, description="devices reporting this model")
    selector: Selector | None = Field(
        None,
        description="labels, all of which must match: `key=value`, `key!=value`, `key` (has it), `!key`, "
        "comma-separated",
        examples=["site=lab-2,tier!=beta"],
    )


@router.get("", response_model=Page[DevicePublic])
async def list_(services: ServicesDep, _: Viewer, query: Annotated[DeviceFilter, Query()]) -> Response:
    """List devices by id, filtered by cohort, status, presence, the model they run or a label selector."""
    # On the reader engine rather than a ReaderDep session: the fleet's busiest read runs on the
    # driver's cursor (list_devices_async), without a session or FastAPI's cost for a dependency
    # that cleans up.
    rows, total = await list_devices_async(
        services.reader_engine(),
        limit=query.limit,
        offset=query.offset,
        cohort_id=query.cohort_id,
        status=query.status,
        presence=query.presence,
        model_id=query.model_id,
        selector=query.selector,
    )
    return page_response(rows, total, limit=query.limit, offset=query.offset)


@router.post(
    "",
    status_code=201,
    responses=errors(
        {
            404: "no such cohort",
            409: "a device with this id exists",
            422: "the id is invalid, or in the namespace of the cloud's own services; or the CSR is "
            "refused (not a CSR, a bad signature, a weak key, a subject naming another device)",
            502: "the broker refused the credentials (nothing was created)",
        }
    ),
)
def provision(
    body: DeviceCreate, session: SessionDep, services: ServicesDep, caller: Operator
) -> DeviceProvisioned:
    """Provision a device. With a CSR the fleet CA certifies the device's own key (CN = the device id)
    and the response holds the certificate: the broker admits it by that name, and learns nothing of
    it now. Without one the response holds a password, shown this once (only a hash is stored), which
    the broker learns before the registry commits: a device the broker refused is not created. Either
    way the response holds the cloud's trusted signing keys with their trust version, which the device
    needs to verify its desired models."""
    if body.csr is not None:
        return _provision_certificate(body, body.csr, session, services, caller.actor)
    device, secret = provision_device(
        session, device_id=body.id, cohort_id=body.cohort_id, labels=body.labels
    )
    audit.record(
        session, actor=caller.actor, action="device.provision", target=body.id, cohort=body.cohort_id
    )
    try:
        for hook in services.hooks:
            hook.provisioned(device.id, secret)
    except Exception as exc:
        session.rollback()
        log.error("provisioning hook failed for %s: %s", device.id, describe_failure(exc))
        raise Problem(
            502, "Bad Gateway", f"the broker did not accept the device: {describe_failure(exc)}"
        ) from None
    if services.hooks:
        device.broker_sync = BrokerSync.synced
    session.commit()
    return provisioned(services, DevicePublic.model_validate(device), secret=secret)


def _provision_certificate(
    body: DeviceCreate, csr: str, session: SessionDep, services: ServicesDep, actor: str
) -> DeviceProvisioned:
    return certify(
        session,
        services,
        actor=actor,
        action="device.provision",
        device_id=body.id,
        cohort_id=body.cohort_id,
        labels=body.labels,
        csr=csr,
    )


def certify(
    session: SessionDep,
    services: ServicesDep,
    *,
    actor: str,
    action: str,
    device_id: str,
    cohort_id: str,
    labels: dict[str, str],
    csr: str,
) -> DeviceProvisioned:
    """Provision a certificate device: the fleet CA certifies the key of `csr`, the registry records
    the device with its certificate, the audit log `action`; committed. The answer to the device."""
    check_new_device(session, device_id=device_id, cohort_id=cohort_id)  # before the CA signs
    ca = services.fleet_ca()
    issued = ca.issue(csr, device_id)
    device = provision_certificate_device(
        session,
        device_id=device_id,
        cohort_id=cohort_id,
        labels=labels,
        certificate=Certificate(issued.serial, issued.sha256, issued.not_after),
    )
    audit.record(
        session, actor=actor, action=action, target=device_id, cohort=cohort_id, certificate=issued.sha256
    )
    session.commit()
    return provisioned(
        services,
        DevicePublic.model_validate(device),
        certificate=issued.pem,
        ca_certificate=ca.certificate_pem,
    )


def provisioned(services: ServicesDep, device: DevicePublic, **credentials: str) -> DeviceProvisioned:
    """The answer to a provisioning: the device, its credentials and the trusted signing keys."""
    trust = services.keyring.trust()
    return DeviceProvisioned(
        device=device,
        secret=credentials.get("secret"),
        certificate=credentials.get("certificate"),
        ca_certificate=credentials.get("ca_certificate"),
        trusted_keys=[TrustedKey.model_validate(k) for k in services.keyring.public_keys()],
        trust_version=trust.version,
        trust_threshold=trust.threshold,
    )


@router.get("/{device_id}", responses=errors({404: "no such device"}))
async def get(device_id: str, reader: ReaderDep, _: Viewer) -> DevicePublic:
    """One device."""
    return DevicePublic.model_validate(await reader.run_sync(get_device, device_id))


@router.patch("/{device_id}", responses=errors({404: "no such device", 422: "more than 32 labels"}))
def update(device_id: str, body: DeviceUpdate, session: SessionDep, caller: Operator) -> DevicePublic:
    """Change a device's labels: set some, remove others (null); lists and rollouts select by them."""
    device = set_labels(session, device_id, body.labels)
    audit.record(session, actor=caller.actor, action="device.label", target=device_id, labels=body.labels)
    session.commit()
    return DevicePublic.model_validate(device)


@router.post(
    "/{device_id}/revoke",
    responses={
        202: {
            "model": DevicePublic,
            "description": "revoked in the registry; the broker could not be told yet (`broker_sync` is "
            "pending, `broker_error` says why): the reconciler applies it when the broker is back",
        },
        **errors({404: "no such device"}),
    },
)
def revoke(
    device_id: str, session: SessionDep, services: ServicesDep, caller: Operator, response: Response
) -> DevicePublic:
    """Revoke a device: its credentials stop working and its live broker session is ended. The
    registry records it first; the broker is told at once, and if it cannot be, the reconciler retries
    until it is. Revoking again is allowed and re-runs the broker hook."""
    device = get_device(session, device_id)
    again = device.status is DeviceStatus.revoked
    if not again:
        revoke_device(session, device_id)
    if services.hooks:
        device.broker_sync = BrokerSync.pending
    audit.record(session, actor=caller.actor, action="device.revoke", target=device_id, again=again)
    session.commit()
    if services.hooks:
        try:
            for hook in services.hooks:
                hook.revoked(device_id, certificate=device.cert_serial is not None)
        except Exception as exc:
            reason = describe_failure(exc)
            log.error("revocation of %s not yet applied to the broker: %s", device_id, reason)
            broker_failed(session, device_id, reason)
            response.status_code = 202
        else:
            broker_applied(session, device_id)
        session.commit()
        session.refresh(device)
    return DevicePublic.model_validate(device)
