"""`diredi devices` and `diredi telemetry show`: the fleet's devices and their status, over the REST API."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from cloud.cli.common import ExitCode, console, fail
from cloud.cli.device_kit import Kit, SecretFile
from cloud.cli.remote import (
    Column,
    Interval,
    JsonOut,
    Limit,
    Offset,
    Profile,
    Timeout,
    api,
    emit,
    paged,
    watch,
)
from cloud.exceptions import CloudError
from cloud.fleet_ca import MAX_CSR_BYTES

devices_app = typer.Typer(
    help="Devices: list (filters, label selectors), show, provision, label, revoke, send commands."
)


DEVICE_COLUMNS: list[Column] = [
    ("id", lambda d: d.id),
    ("cohort", lambda d: d.cohort_id),
    ("status", lambda d: d.status),
    ("presence", lambda d: d.presence),
    ("model", lambda d: d.reported_model_id),
    ("desired", lambda d: d.desired_model_id),
    ("labels", lambda d: d.labels),
    ("last seen", lambda d: d.last_seen),
]


@devices_app.command("list")
def devices_list(
    cohort: Annotated[str | None, typer.Option(help="Only this cohort.")] = None,
    status: Annotated[str | None, typer.Option(help="active or revoked.")] = None,
    presence: Annotated[str | None, typer.Option(help="online or offline.")] = None,
    model: Annotated[str | None, typer.Option(help="Only devices reporting this model.")] = None,
    selector: Annotated[
        str | None, typer.Option("--selector", "-l", help="Labels: 'site=lab-2,tier!=beta,!retired'.")
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="Every page, not only the first.")] = False,
    limit: Limit = 100,
    offset: Offset = 0,
    as_json: JsonOut = False,
    profile: Profile = None,
) -> None:
    """List devices by id."""
    filters = {
        "cohort_id": cohort,
        "status": status,
        "presence": presence,
        "model_id": model,
        "selector": selector,
    }
    with api(profile) as client:
        if every:
            rows = list(client.all_devices(**filters))
            title = f"devices: {len(rows)}"
        else:
            page = client.devices(**filters, limit=limit, offset=offset)
            rows, title = page.items, paged("devices", page.total, len(page.items), offset)
    emit(rows, DEVICE_COLUMNS, as_json=as_json, title=title)


@devices_app.command("show")
def devices_show(device_id: str, as_json: JsonOut = False, profile: Profile = None) -> None:
    """One device."""
    with api(profile) as client:
        device = client.device(device_id)
    emit(device, [*DEVICE_COLUMNS, ("trust", lambda d: d.trust_version), ("broker", lambda d: d.broker_sync)],
         as_json=as_json)  # fmt: skip


def _labels(pairs: Sequence[str], *, removals: bool) -> dict[str, str | None]:
    """`key=value` pairs (and `key-` removals where allowed) as a label change."""
    changes: dict[str, str | None] = {}
    for pair in pairs:
        if removals and pair.endswith("-") and "=" not in pair:
            changes[pair[:-1]] = None
        elif "=" in pair and pair.split("=", 1)[0]:
            key, value = pair.split("=", 1)
            changes[key] = value
        else:
            hint = "key=value or key- (to remove)" if removals else "key=value"
            raise fail(CloudError(f"not a label: {pair!r} (write {hint})"), ExitCode.ERROR)
    return changes


@devices_app.command("provision")
def devices_provision(
    device_id: str,
    cohort: Annotated[str, typer.Option(help="The cohort it joins.")],
    label: Annotated[list[str] | None, typer.Option("--label", help="key=value (repeatable).")] = None,
    secret_file: Annotated[
        Path | None,
        typer.Option(help="Write the device's secret to this new file (mode 0600), not the terminal."),
    ] = None,
    device_dir: Annotated[
        Path | None,
        typer.Option(
            help="Write the device's kit here: device.toml (for `diredi-device run --config`), its "
            "secret, and an inbox/ for its inputs. Needs --broker-url.",
        ),
    ] = None,
    broker_url: Annotated[
        str | None, typer.Option(help="The broker the device connects to (with --device-dir).")
    ] = None,
    csr: Annotated[
        Path | None,
        typer.Option(
            help="The device's certificate signing request (`diredi-device csr`): the device gets a "
            "certificate for its own key instead of a password.",
        ),
    ] = None,
    certificate_file: Annotated[
        Path | None, typer.Option(help="Write the certificate (with --csr) to this new file.")
    ] = None,
    as_json: JsonOut = False,
    profile: Profile = None,
) -> None:
    """Provision a device. Its secret is shown this once (or written to --secret-file or the kit); with
    --csr it is given a certificate instead, printed or written to --certificate-file."""
    labels = {k: v for k, v in _labels(label or [], removals=False).items() if v is not None}
    if csr is not None:
        if device_dir or secret_file or broker_url:
            raise fail(
                CloudError("--csr gives the device a certificate: leave out --device-dir and --secret-file"),
                ExitCode.ERROR,
            )
        _provision_certificate(device_id, cohort, labels, csr, certificate_file, as_json, profile)
        return
    if certificate_file is not None:
        raise fail(CloudError("--certificate-file goes with --csr"), ExitCode.ERROR)
    if device_dir is not None and secret_file is not None:
        raise fail(
            CloudError("--device-dir writes the secret itself; leave out --secret-file"), ExitCode.ERROR
        )
    if (device_dir is None) != (broker_url is None):
        raise fail(CloudError("--device-dir and --broker-url go together"), ExitCode.ERROR)
    with api(profile) as client:
        kit, sink = _sinks(device_dir, broker_url, secret_file, device_id, client.config.url)
        try:
            made = client.provision(device_id, cohort, labels)
        except BaseException:
            if sink is not None:
                sink.abandon()
            raise
    if made.secret is None:
        raise fail(CloudError("the API answered without the device's secret"), ExitCode.ERROR)
    if sink is not None and kit is None:
        sink.write(made.secret)
    config = kit.fill(made) if kit is not None else None
    if as_json:
        console.print_json(made.model_dump_json(exclude={"secret"} if secret_file or kit else set()))
        return
    emit(made.device, DEVICE_COLUMNS, as_json=False, title="provisioned")
    if config is not None:
        console.print(f"device kit written: run it with `diredi-device run --config {config}`")
    elif secret_file is None:
        console.print(f"secret (shown once): {made.secret}")
    else:
        console.print(f"secret written to {secret_file}")


def _provision_certificate(
    device_id: str,
    cohort: str,
    labels: dict[str, str],
    csr_file: Path,
    certificate_file: Path | None,
    as_json: bool,
    profile: str | None,
) -> None:
    request = _read_csr(csr_file)
    if certificate_file is not None and certificate_file.exists():
        raise fail(CloudError(f"{certificate_file} exists; it is never overwritten"), ExitCode.ERROR)
    with api(profile) as client:
        made = client.provision(device_id, cohort, labels, csr=request)
    if certificate_file is not None and made.certificate is not None:
        try:
            certificate_file.write_text(made.certificate)
        except OSError as exc:
            problem = CloudError(f"the device is provisioned, but {certificate_file}: {exc.strerror}")
            raise fail(problem, ExitCode.ERROR) from None
    if as_json:
        console.print_json(made.model_dump_json())
        return
    emit(made.device, DEVICE_COLUMNS, as_json=False, title="provisioned")
    if certificate_file is not None:
        console.print(f"certificate written to {certificate_file}")
    else:
        console.print(made.certificate or "", end="", markup=False, highlight=False)


def _read_csr(path: Path) -> str:
    """The CSR in `path` as text, or a one-line error: the API checks what it says."""
    try:
        data = path.read_bytes()[: MAX_CSR_BYTES + 1]
    except OSError as exc:
        raise fail(CloudError(f"cannot read the CSR {path}: {exc.strerror}"), ExitCode.ERROR) from None
    if len(data) > MAX_CSR_BYTES or b"-----BEGIN CERTIFICATE REQUEST-----" not in data:
        raise fail(CloudError(f"{path} is not a PEM certificate signing request"), ExitCode.ERROR)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise fail(CloudError(f"{path} is not a PEM certificate signing request"), ExitCode.ERROR) from None


def _sinks(
    device_dir: Path | None, broker_url: str | None, secret_file: Path | None, device_id: str, api_url: str
) -> tuple[Kit | None, SecretFile | None]:
    """The kit or the secret file, made before the device is: a secret the API shows once must have
    somewhere to go."""
    try:
        if device_dir is not None and broker_url is not None:
            kit = Kit(device_dir, device_id=device_id, broker_url=broker_url, api_url=api_url)
            return kit, kit.secret
        return None, SecretFile(secret_file) if secret_file is not None else None
    except CloudError as exc:
        raise fail(exc, ExitCode.ERROR) from None


@devices_app.command("label")
def devices_label(
    device_id: str,
    changes: Annotated[list[str], typer.Argument(help="key=value to set, key- to remove.")],
    as_json: JsonOut = False,
    profile: Profile = None,
) -> None:
    """Set or remove labels of a device; the others stay."""
    change = _labels(changes, removals=True)
    with api(profile) as client:
        device = client.label(device_id, change)
    emit(device, DEVICE_COLUMNS, as_json=as_json)


@devices_app.command("revoke")
def devices_revoke(device_id: str, as_json: JsonOut = False, profile: Profile = None) -> None:
    """Revoke a device: its credentials stop working and its broker session ends."""
    with api(profile) as client:
        device = client.revoke(device_id)
    emit(device, DEVICE_COLUMNS, as_json=as_json)


COMMAND_COLUMNS: list[Column] = [
    ("id", lambda c: c.id),
    ("device", lambda c: c.device_id),
    ("command", lambda c: c.command),
    ("state", lambda c: c.state),
    ("sent", lambda c: c.sent_at),
    ("finished", lambda c: c.finished_at),
    ("detail", lambda c: c.detail),
    ("values", lambda c: c.values),
]
FINISHED = {"done", "failed", "refused", "expired"}


@devices_app.command("command")
def devices_command(
    device_id: str,
    command: Annotated[str, typer.Argument(help="report_now or run_rd.")],
    ttl: Annotated[
        int | None,
        typer.Option(min=10, max=86_400, help="Seconds it may wait for the device (default 3600)."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow it until the device answers.")
    ] = True,
    interval: Interval = 1.0,
    timeout: Timeout = 300,
    as_json: JsonOut = False,
    profile: Profile = None,
) -> None:
    """Send a device a command and, by default, wait for its answer: exit 0 when it is done, 1 when the
    device failed or refused it or it expired, 3 when no answer came within --timeout."""
    with api(profile) as client:
        sent = client.send_command(device_id, command, ttl_s=ttl)
        final = sent
        if wait:
            final = watch(
                lambda: client.command(device_id, sent.id),
                describe=lambda c: c.state.value,
                done=lambda c: c.state.value in FINISHED,
                fraction=lambda c: 1.0 if c.state.value in FINISHED else 0.0,
                interval=interval,
                timeout=timeout,
                label=f"{command} on {device_id}",
            )
    emit(final, COMMAND_COLUMNS, as_json=as_json)
    if wait and final.state.value != "done":
        raise typer.Exit(ExitCode.FAILED)


@devices_app.command("commands")
def devices_commands(
    device_id: str, limit: Limit = 20, offset: Offset = 0, as_json: JsonOut = False, profile: Profile = None
) -> None:
    """A device's commands, newest first, with their answers."""
    with api(profile) as client:
        page = client.commands(device_id, limit=limit, offset=offset)
    emit(
        page.items,
        COMMAND_COLUMNS,
        as_json=as_json,
        title=paged("commands", page.total, len(page.items), offset),
    )


TELEMETRY_COLUMNS: list[Column] = [
    ("at", lambda s: s.at),
    ("device", lambda s: s.device_id),
    ("model", lambda s: s.model_id),
    ("accuracy", lambda s: s.accuracy),
    ("confidence", lambda s: s.mean_confidence),
    ("p95 ms", lambda s: s.latency_p95_ms),
    ("inferences", lambda s: s.inference_count),
    ("cpu %", lambda s: s.cpu_percent),
    ("temp °C", lambda s: s.temp_c),
]


def telemetry_show(
    device: Annotated[str | None, typer.Option(help="One device's samples.")] = None,
    model: Annotated[str | None, typer.Option(help="The samples of devices running this model.")] = None,
    since: Annotated[
        datetime | None, typer.Option(help="From (inclusive), ISO 8601; UTC if no zone.")
    ] = None,
    until: Annotated[
        datetime | None, typer.Option(help="Until (exclusive), ISO 8601; UTC if no zone.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Samples.")] = 20,
    as_json: JsonOut = False,
    profile: Profile = None,
) -> None:
    """Recent status samples, newest first, with a summary (mean accuracy and p95 latency)."""
    from datetime import UTC

    since, until = (
        t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t for t in (since, until)
    )
    with api(profile) as client:
        page = client.telemetry(device_id=device, model_id=model, since=since, until=until, limit=limit)
    emit(
        page.items,
        TELEMETRY_COLUMNS,
        as_json=as_json,
        title=paged("samples", page.total, len(page.items), 0),
    )
    if not as_json and page.items:
        accuracies = [s.accuracy for s in page.items if s.accuracy is not None]
        latencies = [s.latency_p95_ms for s in page.items if s.latency_p95_ms is not None]
        console.print(
            f"mean accuracy {_mean(accuracies)}, mean p95 latency {_mean(latencies)} ms over these samples"
        )


def _mean(values: Sequence[float]) -> str:
    return f"{sum(values) / len(values):.3g}" if values else "—"
