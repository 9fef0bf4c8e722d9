"""Enrolment by claim: a device whose image holds its batch's claim certificate asks for its own
certificate by its serial number (which becomes its device id). An operator pre-registers serials
(approved at once) or approves the requests that come in; a request is granted when it is approved."""

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud.exceptions import ConflictError, InvalidValueError, NotFoundError, RegistryError
from cloud.registry.common import paginate
from cloud.registry.devices import check_cohort_id, get_cohort
from cloud.registry.tables import Device, Enrolment, EnrolmentState, utcnow
from wire.topics import reserved_device_id

MAX_PENDING_PER_BATCH = 1000  # requests of one claim waiting for an operator; more are refused


def _check_serial(serial: str) -> None:
    check_cohort_id(serial)  # a device id's pattern: it becomes one
    if (reason := reserved_device_id(serial)) is not None:
        raise RegistryError(reason)


def get_enrolment(session: Session, serial: str) -> Enrolment:
    enrolment = session.get(Enrolment, serial)
    if enrolment is None:
        raise NotFoundError("enrolment", serial)
    return enrolment


def preregister(
    session: Session, *, serial: str, cohort_id: str, labels: dict[str, str], actor: str
) -> Enrolment:
    """Approve `serial` ahead of its request, into `cohort_id`; ConflictError once it is enrolled or a
    device has that id."""
    _check_serial(serial)
    get_cohort(session, cohort_id)
    if session.get(Device, serial) is not None:
        raise ConflictError(f"a device {serial} exists")
    enrolment = session.get(Enrolment, serial)
    if enrolment is None:
        enrolment = Enrolment(serial=serial, state=EnrolmentState.approved, labels={})
        session.add(enrolment)
    elif enrolment.state is EnrolmentState.enrolled:
        raise ConflictError(f"{serial} is enrolled already")
    enrolment.state = EnrolmentState.approved
    enrolment.cohort_id = cohort_id
    enrolment.labels = dict(labels)
    enrolment.decided_at, enrolment.decided_by = utcnow(), actor
    session.flush()
    return enrolment


def request(session: Session, *, serial: str, csr: str, batch: str) -> Enrolment:
    """Record a claim's request for `serial` (pending unless it was approved); ConflictError once the
    serial is enrolled: a claim never takes over a device that has its certificate."""
    _check_serial(serial)
    enrolment = session.get(Enrolment, serial)
    if enrolment is None:
        waiting = session.scalar(
            select(func.count())
            .select_from(Enrolment)
            .where(Enrolment.batch == batch, Enrolment.state == EnrolmentState.pending)
        )
        if (waiting or 0) >= MAX_PENDING_PER_BATCH:
            raise InvalidValueError(f"claim batch {batch} has {waiting} requests waiting for an operator")
        enrolment = Enrolment(serial=serial, state=EnrolmentState.pending, labels={})
        session.add(enrolment)
    elif enrolment.state is EnrolmentState.enrolled:
        raise ConflictError(f"{serial} is enrolled already")
    if enrolment.state is not EnrolmentState.refused:
        enrolment.csr, enrolment.batch, enrolment.requested_at = csr, batch, utcnow()
    session.flush()
    return enrolment


def decide(
    session: Session, serial: str, *, approve: bool, actor: str, cohort_id: str | None = None
) -> Enrolment:
    """Approve a request into `cohort_id` (needed unless pre-registered with one) or refuse it."""
    enrolment = get_enrolment(session, serial)
    if enrolment.state is EnrolmentState.enrolled:
        raise ConflictError(f"{serial} is enrolled already")
    if approve:
        cohort_id = cohort_id or enrolment.cohort_id
        if cohort_id is None:
            raise InvalidValueError("approving needs the cohort the device joins")
        get_cohort(session, cohort_id)
        enrolment.cohort_id = cohort_id
    enrolment.state = EnrolmentState.approved if approve else EnrolmentState.refused
    enrolment.decided_at, enrolment.decided_by = utcnow(), actor
    session.flush()
    return enrolment


def enrolled(session: Session, enrolment: Enrolment) -> None:
    """The request was granted: the device exists now, and the request is no longer kept."""
    enrolment.state = EnrolmentState.enrolled
    enrolment.enrolled_at = utcnow()
    enrolment.csr = None
    session.flush()


def list_enrolments(
    session: Session, *, state: EnrolmentState | None, limit: int, offset: int
) -> tuple[Sequence[Enrolment], int]:
    """A page of enrolments, newest request first, with the total."""
    statement = select(Enrolment).order_by(Enrolment.created_at.desc(), Enrolment.serial)
    if state is not None:
        statement = statement.where(Enrolment.state == state)
    return paginate(session, statement, limit=limit, offset=offset)
