"""`diredi claims` (the claim certificates device images carry) and `diredi enrolments` (the requests
they make, pre-registered or approved by an operator): enrolment by claim, docs/certificate-identity.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cloud.cli.common import ExitCode, console, fail
from cloud.cli.remote import Column, JsonOut, Limit, Offset, Profile, api, emit
from cloud.exceptions import CloudError

claims_app = typer.Typer(help="Claim certificates: what device images carry to enrol themselves.")
enrolments_app = typer.Typer(
    help="Enrolment by claim: pre-register serial numbers, approve or refuse the devices' requests."
)

ENROLMENT_COLUMNS: list[Column] = [
    ("serial", lambda e: e.serial),
    ("state", lambda e: e.state),
    ("cohort", lambda e: e.cohort_id),
    ("batch", lambda e: e.batch),
    ("requested", lambda e: e.requested_at),
    ("decided by", lambda e: e.decided_by),
]


@claims_app.command("issue")
def claims_issue(
    batch: Annotated[str, typer.Option(help="The batch of device images it is for (its CN: claim-BATCH).")],
    out: Annotated[Path, typer.Option(help="A new directory for claim.pem and claim.key (owner-only).")],
    days: Annotated[int, typer.Option(min=1, max=3650, help="How long the claim may enrol devices.")] = 365,
) -> None:
    """Issue a claim certificate and its key from the claim CA (made on first use, beside the signing
    keys). It can enrol devices through the front (POST /api/v1/enrol) and nothing else: the broker
    does not trust its CA. Put both files in the batch's device image."""
    from cloud.cli.common import load_settings
    from cloud.exceptions import InvalidValueError, SigningError
    from cloud.filemodes import write_private
    from cloud.fleet_ca import CLAIM_CA_NAME, FleetCA

    try:
        out.mkdir(mode=0o700, parents=True)
    except OSError as exc:
        raise fail(
            CloudError(f"--out {out}: {exc.strerror} (give a new directory)"), ExitCode.ERROR
        ) from None
    try:
        ca = FleetCA.open(load_settings().resolved_claim_ca_dir, name=CLAIM_CA_NAME)
        key, issued = ca.issue_claim(batch, days=days)
    except (SigningError, InvalidValueError) as exc:
        out.rmdir()
        raise fail(exc, ExitCode.ERROR) from None
    write_private(out / "claim.key", key)
    (out / "claim.pem").write_text(issued.pem)
    console.print(
        f"claim-{batch}: {out / 'claim.pem'} and {out / 'claim.key'}, "
        f"valid until {issued.not_after:%Y-%m-%d}; the front needs the claim CA too: "
        f"diredi front render --claim-ca {ca.directory / 'ca.pem'}",
        highlight=False,
        soft_wrap=True,
    )


@enrolments_app.command("list")
def enrolments_list(
    state: Annotated[str | None, typer.Option(help="pending, approved, enrolled or refused.")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
    as_json: JsonOut = False,
    profile: Profile = None,
) -> None:
    """Enrolments, newest first; --state pending lists the requests waiting for you."""
    with api(profile) as client:
        page = client.enrolments(state=state, limit=limit, offset=offset)
    emit(page.items, ENROLMENT_COLUMNS, as_json=as_json)


@enrolments_app.command("add")
def enrolments_add(
    serial: str,
    cohort: Annotated[str, typer.Option(help="The cohort the device joins.")],
    as_json: JsonOut = False,
    profile: Profile = None,
) -> None:
    """Pre-register a serial number: its device is given its certificate when it first asks."""
    with api(profile) as client:
        made = client.preregister(serial, cohort)
    emit(made, ENROLMENT_COLUMNS, as_json=as_json, title="pre-registered")


@enrolments_app.command("approve")
def enrolments_approve(
    serial: str,
    cohort: Annotated[str | None, typer.Option(help="The cohort it joins (unless pre-registered).")] = None,
    as_json: JsonOut = False,
    profile: Profile = None,
) -> None:
    """Approve a device's request: its next request is granted."""
    with api(profile) as client:
        decided = client.decide_enrolment(serial, approve=True, cohort_id=cohort)
    emit(decided, ENROLMENT_COLUMNS, as_json=as_json, title="approved")


@enrolments_app.command("refuse")
def enrolments_refuse(serial: str, as_json: JsonOut = False, profile: Profile = None) -> None:
    """Refuse a device's request."""
    with api(profile) as client:
        decided = client.decide_enrolment(serial, approve=False)
    emit(decided, ENROLMENT_COLUMNS, as_json=as_json, title="refused")
