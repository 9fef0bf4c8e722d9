"""Enrolment by claim: operators pre-register or approve serial numbers; a device presenting its batch's
claim certificate (through the front) asks for its own certificate with its serial and CSR."""

from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import Field

from cloud.api.deps import Claim, Operator, PageQuery, ReaderDep, ServicesDep, SessionDep, Viewer
from cloud.api.problems import Problem
from cloud.api.routes.devices import certify
from cloud.api.schemas import (
    DeviceProvisioned,
    EnrolmentCreate,
    EnrolmentDecision,
    EnrolmentPublic,
    EnrolmentRequest,
    Page,
    errors,
)
from cloud.fleet_ca import check_signing_request
from cloud.registry import audit, enrolments
from cloud.registry.tables import EnrolmentState

router = APIRouter(prefix="/api/v1", tags=["enrolment"])


class EnrolmentFilter(PageQuery):
    state: EnrolmentState | None = Field(None)


@router.get("/enrolments")
async def list_(
    reader: ReaderDep, _: Viewer, query: Annotated[EnrolmentFilter, Query()]
) -> Page[EnrolmentPublic]:
    """Enrolments, newest first; `state=pending` lists the requests waiting for an operator."""
    rows, total = await reader.run_sync(
        enrolments.list_enrolments, state=query.state, limit=query.limit, offset=query.offset
    )
    return Page.of(EnrolmentPublic, rows, total, limit=query.limit, offset=query.offset)


@router.post(
    "/enrolments",
    status_code=201,
    responses=errors({404: "no such cohort", 409: "enrolled already, or a device has this id"}),
)
def preregister(body: EnrolmentCreate, session: SessionDep, caller: Operator) -> EnrolmentPublic:
    """Pre-register a serial number: the device with this serial that asks with a claim certificate is
    given its certificate at once, in this cohort, with these labels."""
    enrolment = enrolments.preregister(
        session, serial=body.serial, cohort_id=body.cohort_id, labels=body.labels, actor=caller.actor
    )
    audit.record(
        session, actor=caller.actor, action="enrolment.preregister", target=body.serial, cohort=body.cohort_id
    )
    session.commit()
    return EnrolmentPublic.model_validate(enrolment)


@router.post(
    "/enrolments/{serial}/approve",
    responses=errors({404: "no such enrolment or cohort", 409: "enrolled already", 422: "no cohort"}),
)
def approve(serial: str, body: EnrolmentDecision, session: SessionDep, caller: Operator) -> EnrolmentPublic:
    """Approve a request: the device's next request is granted."""
    enrolment = enrolments.decide(session, serial, approve=True, actor=caller.actor, cohort_id=body.cohort_id)
    audit.record(
        session, actor=caller.actor, action="enrolment.approve", target=serial, cohort=enrolment.cohort_id
    )
    session.commit()
    return EnrolmentPublic.model_validate(enrolment)


@router.post("/enrolments/{serial}/refuse", responses=errors({404: "no such enrolment", 409: "enrolled"}))
def refuse(serial: str, session: SessionDep, caller: Operator) -> EnrolmentPublic:
    """Refuse a request: the claim gets 403 for this serial from now on."""
    enrolment = enrolments.decide(session, serial, approve=False, actor=caller.actor)
    audit.record(session, actor=caller.actor, action="enrolment.refuse", target=serial)
    session.commit()
    return EnrolmentPublic.model_validate(enrolment)


@router.post(
    "/enrol",
    status_code=201,
    responses={
        202: {"model": EnrolmentPublic, "description": "recorded; an operator decides (ask again later)"},
        **errors(
            {
                403: "refused by an operator, or not a claim certificate",
                409: "this serial is enrolled already",
                422: "a bad serial or CSR (its CN must be the serial), or too many of the batch wait",
            }
        ),
    },
)
def enrol(
    body: EnrolmentRequest, session: SessionDep, services: ServicesDep, caller: Claim, response: Response
) -> DeviceProvisioned | EnrolmentPublic:
    """A device asks for its certificate with its batch's claim certificate. Granted (201, the device is
    provisioned with its certificate and the trusted keys) when its serial was pre-registered or
    approved; otherwise recorded (202) for an operator to decide. The serial becomes the device id."""
    check_signing_request(body.csr, body.serial)  # refused now, not when an operator approves it
    enrolment = enrolments.request(session, serial=body.serial, csr=body.csr, batch=str(caller.claim))
    if enrolment.state is EnrolmentState.refused:
        session.rollback()
        raise Problem(403, "Forbidden", f"the enrolment of {body.serial} was refused")
    if enrolment.state is EnrolmentState.pending or enrolment.cohort_id is None:
        audit.record(session, actor=caller.actor, action="enrolment.request", target=body.serial)
        session.commit()
        response.status_code = 202
        return EnrolmentPublic.model_validate(enrolment)
    enrolments.enrolled(session, enrolment)  # committed with the device, or not at all
    return certify(
        session,
        services,
        actor=caller.actor,
        action="device.enrol",
        device_id=body.serial,
        cohort_id=enrolment.cohort_id,
        labels=dict(enrolment.labels),
        csr=body.csr,
    )
